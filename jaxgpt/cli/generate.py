"""`jaxgpt generate --ckpt DIR (--prompt TEXT ... | --prompt-file FILE) [sampling flags]`

Prints each completion as text (prompt + completion, then a line of dashes), or with --json one
JSON line per completion. --stream generates one row at a time and prints its tokens as each
decode chunk lands; a row gets the same tokens as in a batch (same seed and row id).
"""

from __future__ import annotations

import codecs
import json
import os
import sys
import time

from jaxgpt.errors import UserError

SEPARATOR = "-" * 40


def add_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True, help="run folder holding the checkpoints")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable; '' starts from <|endoftext|>)")
    src.add_argument("--prompt-file", help="one prompt per line, or JSONL with a 'prompt' field")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-at-eot", action="store_true", help="end a completion at <|endoftext|>")
    p.add_argument("--stream", action="store_true", help="print tokens as they come, one row at a time")
    p.add_argument("--json", action="store_true", help="one JSON line per completion")
    # --- beam search (jaxgpt/generation/beam.py)
    p.add_argument("--num-beams", type=int, default=1, metavar="K",
                   help="beam search with K beams (transformers' semantics; no sampling flags)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam search: score = sum log-probs / new_tokens ** this (default 1.0)")
    p.add_argument("--early-stopping", choices=["false", "true", "never"], default=None,
                   help="beam search: when to stop (transformers' early_stopping; default false)")
    p.add_argument("--num-return-sequences", type=int, default=None, metavar="M",
                   help="beam search: the M best beams of each prompt (default 1; with --json "
                        "each gets a line with its score)")
    # --- end beam search
    # --- speculative decoding (jaxgpt/generation/speculative.py)
    p.add_argument("--draft", default=None, metavar="CKPT",
                   help="a smaller model's run folder (same tokenizer): exact speculative decoding")
    p.add_argument("--num-draft", type=int, default=None, metavar="K",
                   help="tokens the draft proposes per round (default 4; needs --draft)")
    # --- end speculative decoding
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="compute dtype and KV cache dtype (default: the run's; auto = bfloat16 on "
                        "GPU/TPU, float32 on CPU); the weights on disk are float32 either way")
    # --- int8 quantization (jaxgpt/quant.py; choices = quant.MODES, not imported: jax is slow to load)
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="serve with int8 weight-only quantization (the checkpoint is unchanged)")
    # --- end int8 quantization
    # --- sharded weights (jaxgpt/train/parallel.py)
    p.add_argument("--mesh", default=None, metavar="AXIS:SIZE,...",
                   help="serve the weights sharded over a device mesh, e.g. tensor:2 or "
                        "data:1,fsdp:1,tensor:8 (axes data, fsdp, tensor; one may be -1); greedy "
                        "output is the same as unsharded")
    # --- end sharded weights
    p.set_defaults(func=run)


def check_args(args) -> None:
    """Reject bad values before the (slow) checkpoint load, naming the flag."""
    def bad(flag, need, got):
        raise UserError(f"--{flag} must be {need}, got {got}")

    if args.num_samples < 1:
        bad("num-samples", ">= 1", args.num_samples)
    if args.max_new_tokens < 1:
        bad("max-new-tokens", ">= 1", args.max_new_tokens)
    if args.temperature is not None and not args.temperature >= 0:
        bad("temperature", ">= 0 (0 = greedy)", args.temperature)
    # --- beam search: its own flags, and none of sampling's
    if args.num_beams < 1:
        bad("num-beams", ">= 1", args.num_beams)
    beam_flags = [f for f, v in (("length-penalty", args.length_penalty), ("early-stopping", args.early_stopping),
                                 ("num-return-sequences", args.num_return_sequences)) if v is not None]
    if args.num_beams == 1 and beam_flags:
        raise UserError(f"--{beam_flags[0]} needs --num-beams > 1")
    if args.num_beams > 1:
        clash = [f for f, v in (("temperature", args.temperature), ("top-k", args.top_k), ("top-p", args.top_p),
                                ("min-p", args.min_p), ("repetition-penalty", args.repetition_penalty),
                                ("draft", args.draft)) if v is not None]
        clash += [f for f, on in (("stream", args.stream), ("num-samples", args.num_samples > 1)) if on]
        if clash:
            raise UserError(f"--num-beams {args.num_beams} is deterministic beam search: it cannot be "
                            f"combined with --{clash[0]}" + (" (use --num-return-sequences)"
                                                           if clash[0] == "num-samples" else ""))
        if args.num_return_sequences is not None and not 1 <= args.num_return_sequences <= args.num_beams:
            bad("num-return-sequences", f"in [1, --num-beams={args.num_beams}]", args.num_return_sequences)
    # --- end beam search
    if args.top_k is not None and args.top_k < 1:
        bad("top-k", ">= 1", args.top_k)
    if args.top_p is not None and not 0 < args.top_p <= 1:
        bad("top-p", "in (0, 1]", args.top_p)
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        bad("min-p", "in [0, 1]", args.min_p)
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        bad("repetition-penalty", "> 0", args.repetition_penalty)
    if args.seed < 0:
        bad("seed", ">= 0", args.seed)
    if args.num_draft is not None:  # speculative decoding
        if args.draft is None:
            raise UserError("--num-draft needs --draft CKPT")
        if args.num_draft < 1:
            bad("num-draft", ">= 1", args.num_draft)


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a file: JSONL (a .jsonl file, or a first line that is a JSON object) with a
    string field 'prompt' per line, else one prompt per non-blank line."""
    if not os.path.isfile(path):
        raise UserError(f"prompt file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read prompt file {path}: {e}") from None
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        raise UserError(f"prompt file {path} has no prompts")
    if path.endswith(".jsonl") or _is_json_object(lines[0][1]):
        prompts = []
        for i, ln in lines:
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{path}:{i}: expected a JSON object with a string field 'prompt'")
            prompts.append(obj["prompt"])
        return prompts
    return [ln for _, ln in lines]


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def run(args) -> int:
    check_args(args)
    texts = read_prompt_file(args.prompt_file) if args.prompt_file else list(args.prompt)

    from jaxgpt.checkpoint import load_model
    from jaxgpt.generation import generate
    from jaxgpt.tokenizer import get_tokenizer

    mesh = None
    if args.mesh is not None:  # sharded weights
        from jaxgpt.train.parallel import as_mesh
        mesh = as_mesh(args.mesh)
    model, _, meta = load_model(args.ckpt, step=args.step, dtype=args.dtype, mesh=mesh)
    if args.quantize:  # int8 quantization
        from jaxgpt.quant import quantize_model
        model = quantize_model(model, args.quantize)
    if "tokenizer" not in meta:
        raise UserError(f"checkpoint {args.ckpt} does not name its tokenizer")
    tok = get_tokenizer(meta["tokenizer"])
    block = model.cfg.block_size
    encoded = []
    for i, t in enumerate(texts):
        ids = tok.encode(t) or [tok.eot_id]  # an empty prompt starts a fresh document
        if len(ids) > block:
            print(f"note: prompt {i} has {len(ids)} tokens; generation sees the last {block}",
                  file=sys.stderr)
        encoded.append(ids)
    # --num-samples repeats each prompt; rows differ through their row id (per-row RNG).
    rows = [(p, s) for p in range(len(texts)) for s in range(args.num_samples)]
    prompts = [encoded[p] for p, _ in rows]
    kw = dict(temperature=0.8 if args.temperature is None else args.temperature, top_k=args.top_k,
              top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
              seed=args.seed, eos_id=tok.eot_id if args.stop_at_eot else None)
    if args.num_beams > 1:  # --- beam search
        return _run_beams(args, model, tok, texts, encoded)
    # --- speculative decoding: load the draft, check it speaks the model's tokenizer
    drafting = args.draft is not None
    if drafting:
        draft, _, draft_meta = load_model(args.draft, dtype=args.dtype)
        if draft_meta.get("tokenizer") != meta["tokenizer"] or draft.cfg.vocab_size != model.cfg.vocab_size:
            raise UserError(
                f"--draft {args.draft} uses tokenizer {draft_meta.get('tokenizer')!r} with "
                f"{draft.cfg.vocab_size} ids, the model {meta['tokenizer']!r} with {model.cfg.vocab_size}: "
                f"the draft must use the same tokenizer and vocabulary")
        kw.update(draft=draft, num_draft=args.num_draft or 4, return_stats=True)
    accepted = {}  # row -> draft tokens accepted per round (speculative decoding)
    # --- end speculative decoding

    def emit(r, new, seconds):
        p, s = rows[r]
        shown = new[:-1] if args.stop_at_eot and new and new[-1] == tok.eot_id else new
        if args.json:
            line = {"prompt": texts[p], "sample": s, "completion": tok.decode(shown),
                    "prompt_tokens": len(prompts[r]), "new_tokens": len(new), "seconds": round(seconds, 4)}
            if r in accepted:
                line["draft_accepted_per_round"] = accepted[r]
            print(json.dumps(line), flush=True)
        elif not args.stream:
            print(texts[p] + tok.decode(shown))
            print(SEPARATOR, flush=True)

    def record(r0, stats):  # speculative decoding: per-row acceptance for --json
        for i, (a, n) in enumerate(zip(stats.accepted, stats.rounds)):
            accepted[r0 + i] = round(a / max(n, 1), 4)

    if not args.stream:
        t0 = time.perf_counter()
        out = generate(model, prompts, args.max_new_tokens, **kw)
        seconds = time.perf_counter() - t0  # rows generated together share the wall time
        if drafting:
            out, stats = out
            record(0, stats)
        for r, new in enumerate(out):
            emit(r, new, seconds)
        if drafting and not args.json:
            _report(stats)
        return 0

    for r in range(len(rows)):
        t0 = time.perf_counter()
        new = []
        text_out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if not args.json:
            print(texts[rows[r][0]], end="", flush=True)
        # Half the default chunk: updates every ~0.5 s at ~30 ms per token.
        pieces = generate(model, [prompts[r]], args.max_new_tokens, stream=True, row_ids=[r],
                          chunk=16, **kw)
        if drafting:
            pieces, stats = pieces
        for piece in pieces:
            new.extend(piece[0])
            if not args.json:
                shown = [t for t in piece[0] if not (args.stop_at_eot and t == tok.eot_id)]
                # Bytes, not text: a multi-byte character can straddle two chunks.
                print(text_out.decode(tok.decode_bytes(shown)), end="", flush=True)
        if drafting:
            record(r, stats)
        if args.json:
            emit(r, new, time.perf_counter() - t0)
        else:
            print(text_out.decode(b"", final=True))
            print(SEPARATOR, flush=True)
            if drafting:
                _report(stats)
    return 0


def _report(stats) -> None:
    """Speculative decoding's acceptance, on stderr (stdout keeps only the text)."""
    print(f"draft: {stats.mean_accepted:.2f} of {stats.num_draft} proposed tokens accepted per round "
          f"(acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_round:.2f} tokens per target pass)",
          file=sys.stderr, flush=True)


def _run_beams(args, model, tok, texts, encoded) -> int:
    """--num-beams: every returned beam of every prompt, best first, with its score."""
    from jaxgpt.generation import generate

    m = args.num_return_sequences or 1
    t0 = time.perf_counter()
    seqs, scores = generate(
        model, encoded, args.max_new_tokens, num_beams=args.num_beams,
        length_penalty=1.0 if args.length_penalty is None else args.length_penalty,
        early_stopping={"false": False, "true": True, "never": "never"}[args.early_stopping or "false"],
        num_return_sequences=m, eos_id=tok.eot_id if args.stop_at_eot else None, return_scores=True)
    seconds = time.perf_counter() - t0
    for r, (new, score) in enumerate(zip(seqs, scores)):
        p, beam = divmod(r, m)
        shown = new[:-1] if args.stop_at_eot and new and new[-1] == tok.eot_id else new
        if args.json:
            print(json.dumps({"prompt": texts[p], "beam": beam, "score": round(float(score), 6),
                              "completion": tok.decode(shown), "prompt_tokens": len(encoded[p]),
                              "new_tokens": len(new), "seconds": round(seconds, 4)}), flush=True)
        else:
            print(f"[beam {beam}, score {score:.4f}] " + texts[p] + tok.decode(shown))
            print(SEPARATOR, flush=True)
    return 0
