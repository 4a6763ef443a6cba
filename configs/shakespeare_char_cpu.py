# nanoGPT's CPU recipe on byte-level Tiny Shakespeare: reaches val loss ~1.88 in 2000 steps.
#   jaxgpt prepare --input tinyshakespeare.txt --out data/shakespeare_char --tokenizer byte
overrides = {
    "data": "data/shakespeare_char",
    "out": "out/shakespeare_char_cpu",
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.block_size": 64,
    "model.dropout": 0.0,
    "model.bias": False,
    "batch_size": 12,
    "max_steps": 2000,
    "lr": 1e-3,
    "min_lr": 1e-4,
    "decay_steps": 2000,
    "warmup_steps": 100,
    # nanoGPT estimates val loss on 20 batches (15k tokens, +-0.02 noise); 200 batches cover more
    # tokens than the whole val split, so the reported figure is the model's, not the sample's.
    "eval_steps": 200,
}
