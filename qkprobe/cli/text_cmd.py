"""``qkprobe run hf:DIR --text FILE``: per-mode statistics over sentences (see :mod:`qkprobe.text`)."""

from __future__ import annotations

import os
import sys
import time

from ..errors import QKProbeError, RunFileError


def check_text_options(args) -> None:
    """What ``--text`` cannot be combined with, before anything is loaded."""
    if not args.text:
        raise QKProbeError("--text-field names the field of a --text JSONL file; pass the file with --text.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise QKProbeError("qkprobe run --text runs in one process; start it without torchrun.")
    for option, value in (("--labels", getattr(args, "labels", None)), ("--image-size", args.image_size),
                          ("--mean", args.mean), ("--std", args.std)):
        if value is not None:
            raise QKProbeError(f"{option} applies to images, not to --text; leave it out.")
    if args.text_field is not None and not args.text_field.strip():
        raise QKProbeError("--text-field is empty; name the JSON field that holds each sentence, e.g. text.")


def run_text(args) -> int:
    """Record the sentences of ``args.text`` into ``args.out`` (resumable, one row per sentence)."""
    import torch
    from tqdm import tqdm

    from ..adapters.discover import find_attention
    from ..bases import layer_bases
    from ..capture.probe import attach
    from ..metadata import versions
    from ..text import TEXT_FIELD, TEXT_ROOT, batches, encode, is_tokenizer, read_sentences, sentence_ids, \
        tokenizer_prefix_tokens
    from .common import load_from_args, make_out_folder
    from .run_cmd import _check_out, _check_resumable, probe_options, wrote_line

    check_text_options(args)
    _check_out(args)
    sentences = read_sentences(args.text, args.text_field)
    make_out_folder(args.out)
    model, tokenizer, meta = load_from_args(args, device=args.device)
    if not is_tokenizer(tokenizer):
        raise RunFileError(f"{args.spec} has no tokenizer; qkprobe run --text needs a text model whose folder "
                           f"holds its tokenizer files.")
    options = probe_options(args)
    meta["versions"] = versions()
    meta[TEXT_FIELD] = args.text_field or ""
    done: set = set()
    recorded = None
    if args.resume:
        _check_resumable(args.out, meta, options.record())
        from ..sinks.run_file import open_run
        with open_run(args.out) as run:
            done = set(run.ids) | {s for s, _ in run.skipped}
            rows_before = len(run.ids)
            recorded = run.metadata.get(TEXT_ROOT) or None
    meta[TEXT_ROOT], ids = sentence_ids(args.text, sentences, recorded)
    if done and not done.intersection(ids):
        raise RunFileError(f"None of the {len(ids)} sentences of {args.text} is among the {len(done)} already in "
                           f"{args.out}; resume with the file the run started with, or write a new --out.")
    todo = [(s, i) for s, i in zip(sentences, ids) if i not in done]
    print(f"{len(todo)} new sentences, {len(ids) - len(todo)} already in {args.out}", flush=True)
    n_prefix = tokenizer_prefix_tokens(tokenizer)  # [CLS]: a prefix token; [SEP]: a map token (qkprobe.text)
    bases = [layer_bases(site, model, n_prefix=n_prefix) for site in find_attention(model)]
    probe = attach(model, args.out, options=options, bases=bases, metadata=meta, resume=args.resume,
                   chunk_rows=min(max(args.batch_size, 8), 256))
    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=len(todo), unit="sent", disable=args.no_progress, desc="qkprobe run")
    try:
        with torch.no_grad():
            for texts, batch_ids in batches([s for s, _ in todo], [i for _, i in todo], args.batch_size):
                probe.set_ids(batch_ids)
                model(**encode(tokenizer, texts, args.device))
                seen += len(texts)
                if args.verbose:
                    print(f"committed {probe.writer.acknowledged}", flush=True)
                bar.update(len(texts))
    finally:
        bar.close()
        probe.close()
    for name, count in probe.nonfinite().items():
        print(f"warning: {count} non-finite mode coordinates (NaN/Inf activations) in {name}; "
              f"counted in the file, the run went on", file=sys.stderr)
    print(wrote_line(seen, "sentences", "sent", args.out, rows_before if args.resume else None,
                     seen / (time.perf_counter() - t0)))
    return 0
