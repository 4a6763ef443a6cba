# nanoGPT's GPU recipe on byte-level Tiny Shakespeare (val ~1.47 after 5000 steps on a GPU).
#   jaxgpt prepare --input tinyshakespeare.txt --out data/shakespeare_char --tokenizer byte
overrides = {
    "data": "data/shakespeare_char",
    "out": "out/shakespeare_char",
    "model.n_layer": 6,
    "model.n_head": 6,
    "model.n_embd": 384,
    "model.block_size": 256,
    "model.dropout": 0.2,
    "model.bias": False,
    "batch_size": 64,
    "max_steps": 5000,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "eval_steps": 200,
}
