# GPT-2 small (124M) from scratch, nanoGPT's OpenWebText recipe: 2^19 = 524,288 tokens per step
# (512 sequences of 1024, reached by 32 accumulation micro-steps), bf16 compute.
#   jaxgpt prepare --input your_corpus/ --out data/openwebtext --tokenizer gpt2
overrides = {
    "data": "data/openwebtext",
    "out": "out/gpt2_124m",
    "model.n_layer": 12,
    "model.n_head": 12,
    "model.n_embd": 768,
    "model.block_size": 1024,
    "batch_size": 512,
    "grad_accum": 32,
    "max_steps": 600000,
    "lr": 6e-4,
    "min_lr": 6e-5,
    "warmup_steps": 2000,
    "beta2": 0.95,
    "dtype": "bfloat16",
    "eval_interval": 1000,
    "eval_steps": 200,
    "save_interval": 1000,
}
