"""Backend-specific kernels, each tested equal to the reference path it replaces:
cpu_stack.py, cpu_loss.py and cpu_decode.py (the `cpu` attention backend) and int8.py (the
int8 product kernel, int8_matmul.cc, built by setup.py)."""
