"""Benchmark: language-model distillation at real vocabulary sizes, in parts.

    python benchmarks/lm_scale.py [PART ...] [--repeats 5] [--threads 1] [--malloc trainer|default]

Each part is a function of the parsed arguments returning a dict (``PARTS``); with no PART, all of
them run. The results are merged into ``benchmarks/results/lm_scale.json`` (read, the parts run
replaced, the others kept) and ``benchmarks/results/lm_scale.md`` is rendered again from the whole
JSON. A part's dict holds
``meta`` (machine, threads, load average, date, configuration), ``rows`` (one table row each: a
dict of column -> value) and ``summary`` (named figures), which the renderer prints as they are.

Parts:

- ``fused``: peak memory and time of one distillation step (forward and backward of the loss,
  the output heads' matmuls included) at GPT-2's vocabulary (50,257) and a synthetic 151,936, for
  the fused head loss (``distill.losses.fused_head.fused_token_gjsd``: logits computed chunk by
  chunk inside the loss), today's path (the head's matmul -> full logits -> ``token_gjsd``, at the
  same chunk size, and at its default one), and GKD's loss as TRL writes it (plain autograd over
  full logits). Each variant runs in a fresh subprocess: peak memory is ``ru_maxrss`` after the step
  minus the resident size just before it (the inputs are built without temporaries, so the
  high-water mark before the step is the resident size; the gap is recorded); time is the
  median over interleaved repeats. glibc's malloc is tuned as distill's trainer tunes it on the
  CPU (``distill.allocator.keep_freed_memory``; ``--malloc default`` leaves it alone). The fused
  loss holds one chunk's logits and one piece's temporaries whatever the number of tokens, today's
  path all the logits, so the part also measures the two once at 4,096 tokens (vocab 50,257). One profiled step of each (vocab 50,257)
  splits the time into matrix products and the rest.
- ``cache``: the token-level teacher cache (``distill.token_cache``) on a real tokenizer: the preset
  ``tinyshakespeare-gpt`` on GPT-2 BPE tokens (vocab 50,257; ``--data-root`` holds
  ``tinyshakespeare/input.txt`` and ``gpt2-tokenizer/``), ``--blocks`` training blocks; the teacher
  trained once by ``distill run``, cached by ``distill cache`` as its top-64 log-probabilities per
  token, then the student alone, distilled from the cache, and distilled from the live teacher
  (same steps): perplexity, epoch time, bytes per token on disk.
- ``cache_hard`` (after ``cache``): the same two distilled students with 0.5 x token CE on the
  labels + 0.5 x forward KL (the top-64 bucket KL leaves the spread of the teacher's tail to the
  student; the labels constrain it), against the same alone.
- ``cache_steps`` (after ``cache``): the same three arms' training steps timed interleaved in one
  process (rounds of a few steps each, the order rotated), the median step time of each.
- ``fused_recipe`` (after ``cache``): the recipe-level figure of ``task_options.fused_head``: one
  training step of the preset's distilled stage, as ``distill run`` builds it (``stage.build_stage``:
  the recipe's terms, feed and teacher signal), with and without ``fused_head``, from the live teacher
  and from part ``cache``'s top-64 cache, at ``--recipe-tokens`` tokens a batch (vocab 50,257). Each
  variant in a fresh subprocess: peak memory of the first step (``ru_maxrss`` after it minus the
  resident size before it, the gap recorded as in part ``fused``), time the median of the next steps.
- ``fsdp``: ``benchmarks/fsdp_equality.py``: a sharded student (``train.sharding: fsdp``) on 2 CPU
  processes (gloo) against 1 process: max abs weight difference after the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH, MD_PATH = RESULTS / "lm_scale.json", RESULTS / "lm_scale.md"


# ------------------------------------------------------------------------------------------ common
def machine(threads: int) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
    }


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------ fused
FUSED = {
    "vocabs": [50257, 151936],
    "tokens": 1024,  # batch 2 x 512 positions, every one scored
    "batch": 2,
    "longer": {"vocab": 50257, "tokens": 4096},  # fused and today once more, at 4x the tokens
    "student_hidden": 256,
    "teacher_hidden": 512,
    "dtype": "float32",
    "chunk_tokens": 128,  # fused_head's default, for both paths
    "beta": 0.5,
    "temperature": 1.0,
}
# the variants timed in every repeat (their ratio is the figure), and those run once for reference
RATIO_VARIANTS = ["fused", "today"]
ONCE_VARIANTS = ["today_default_chunk", "trl_gkd"]
DESCRIPTIONS = {
    "fused": "fused_token_gjsd(Head(h_s, W_s), Head(h_t, W_t)), chunk_tokens={chunk}",
    "today": "F.linear -> full logits -> token_gjsd, chunk_tokens={chunk}",
    "today_default_chunk": "F.linear -> full logits -> token_gjsd, default chunk_tokens=4096",
    "trl_gkd": "F.linear -> full logits -> TRL's generalized_jsd_loss formula (plain autograd)",
}


def trl_generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0):
    """GKD's generalised JSD as TRL's ``GKDTrainer.generalized_jsd_loss`` computes it (Agarwal et al.
    2024), written here from the paper and TRL's documentation: full log-softmaxes, the mixture by
    ``logsumexp`` of the stacked, weighted log-probabilities, two ``kl_div``s with ``log_target``, and
    ``batchmean`` (the sum over everything divided by the number of positions). No T² factor."""
    import math

    import torch
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True)
    jsd = beta * kl_t + (1 - beta) * kl_s
    return jsd.sum() / (jsd.numel() / jsd.shape[-1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


MATMULS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")  # the kernels (not linear, matmul: wrappers)


def fused_worker(variant: str, vocab: int, tokens: int, threads: int, profile: bool = False,
                 malloc: str = "trainer") -> dict:
    """One step of ``variant`` in this (fresh) process: its peak memory and time; with ``profile``,
    the step's operator time split into matrix products and everything else (torch.profiler)."""
    import torch
    import torch.nn.functional as F

    from distill.losses.fused_head import Head, fused_token_gjsd
    from distill.losses.token_divergences import token_gjsd_loss

    torch.set_num_threads(threads)
    if malloc == "trainer":
        from distill.allocator import keep_freed_memory

        keep_freed_memory()
    cfg = FUSED
    chunk, beta, temp = cfg["chunk_tokens"], cfg["beta"], cfg["temperature"]

    def inputs(tokens: int, v: int):
        # built in place, so that no temporary raises the high-water mark before the step
        g = torch.Generator().manual_seed(0)
        t = tokens // cfg["batch"]
        h_s = torch.randn(cfg["batch"], t, cfg["student_hidden"], generator=g).requires_grad_()
        w_s = torch.randn(v, cfg["student_hidden"], generator=g).mul_(cfg["student_hidden"] ** -0.5).requires_grad_()
        h_t = torch.randn(cfg["batch"], t, cfg["teacher_hidden"], generator=g)
        w_t = torch.randn(v, cfg["teacher_hidden"], generator=g).mul_(cfg["teacher_hidden"] ** -0.5)
        return h_s, w_s, h_t, w_t

    def step(h_s, w_s, h_t, w_t):
        if variant == "fused":
            loss = fused_token_gjsd(Head(h_s, w_s), Head(h_t, w_t), None, beta=beta, temperature=temp,
                                    chunk_tokens=chunk)
        else:
            student = F.linear(h_s, w_s)
            with torch.no_grad():
                teacher = F.linear(h_t, w_t)
            if variant == "today":
                loss = token_gjsd_loss(student, teacher, None, beta=beta, temperature=temp, chunk_tokens=chunk)
            elif variant == "today_default_chunk":
                loss = token_gjsd_loss(student, teacher, None, beta=beta, temperature=temp)
            elif variant == "trl_gkd":
                loss = trl_generalized_jsd(student, teacher, beta=beta, temperature=temp)
            else:
                raise SystemExit(f"unknown variant {variant!r}")
        loss.backward()
        return float(loss.detach())

    step(*inputs(16, 1024))  # warm up the kernels, far below the step's peak (a small vocabulary)
    data = inputs(tokens, vocab)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            value = step(*data)
            seconds = time.perf_counter() - start
        ops = prof.key_averages()
        matmul = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS) / 1e6
        calls = sum(e.count for e in ops if e.key in MATMULS)
        return {"variant": variant, "vocab": vocab, "tokens": tokens, "loss": value, "seconds": seconds,
                "matmul_seconds": matmul, "matmul_calls": calls,
                "other_seconds": sum(e.self_cpu_time_total for e in ops) / 1e6 - matmul,
                "load_average": load_average()}
    rss, before = _rss_bytes(), _maxrss_bytes()
    start = time.perf_counter()
    value = step(*data)
    seconds = time.perf_counter() - start
    after = _maxrss_bytes()
    return {"variant": variant, "vocab": vocab, "tokens": tokens, "loss": value, "seconds": seconds, "peak_bytes": after - rss,
            "maxrss_gap_before_bytes": before - rss, "load_average": load_average()}


def _spawn(variant: str, vocab: int, tokens: int, threads: int, malloc: str, profile: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "fused", variant, str(vocab), str(tokens), "--threads", str(threads),
         "--malloc", malloc, *(["--profile"] if profile else [])],
        capture_output=True, text=True, env=env, check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {variant} at vocab {vocab} failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    shown = (f"matmul {record['matmul_seconds']:.1f} s, other {record['other_seconds']:.1f} s" if profile
             else f"{record['peak_bytes'] / 2**20:8.0f} MiB")
    print(f"  {variant:20s} vocab {vocab:6d} tokens {tokens:5d}: {shown}, {record['seconds']:6.1f} s, "
          f"loss {record['loss']:.6f}, load {record['load_average'][0]}", flush=True)
    return record


def part_fused(args: argparse.Namespace) -> dict:
    repeats, threads, malloc = args.repeats, args.threads, args.malloc
    meta = {"machine": machine(threads), "date_start": now(), "load_average_start": load_average(),
            "config": {**FUSED, "malloc": malloc}, "repeats": repeats, "variants": {k: v.format(chunk=FUSED["chunk_tokens"])
                                                              for k, v in DESCRIPTIONS.items()}}
    runs: list[dict] = []
    tokens, longer = FUSED["tokens"], FUSED["longer"]
    for vocab in FUSED["vocabs"]:
        for r in range(repeats):  # interleaved, the order rotated, so machine noise hits both alike
            order = RATIO_VARIANTS[r % 2:] + RATIO_VARIANTS[:r % 2]
            runs += [_spawn(v, vocab, tokens, threads, malloc) for v in order]
        runs += [_spawn(v, vocab, tokens, threads, malloc) for v in ONCE_VARIANTS]
    runs += [_spawn(v, longer["vocab"], longer["tokens"], threads, malloc) for v in RATIO_VARIANTS]
    # where the time goes: one profiled step of each, at the smaller vocabulary
    profiled = [_spawn(v, FUSED["vocabs"][0], tokens, threads, malloc, profile=True) for v in RATIO_VARIANTS]
    rows, summary = [], {}
    settings = [(vocab, tokens, RATIO_VARIANTS + ONCE_VARIANTS) for vocab in FUSED["vocabs"]]
    for vocab, n_tokens, variants in settings + [(longer["vocab"], longer["tokens"], RATIO_VARIANTS)]:
        logits_bytes = n_tokens * vocab * 4
        stats = {}
        for variant in variants:
            mine = [x for x in runs if x["variant"] == variant and x["vocab"] == vocab and x["tokens"] == n_tokens]
            stats[variant] = {
                "peak_mib": statistics.median(x["peak_bytes"] for x in mine) / 2**20,
                "seconds": statistics.median(x["seconds"] for x in mine),
                "n": len(mine),
                "loss": mine[0]["loss"],
                "max_gap_mib": max(x["maxrss_gap_before_bytes"] for x in mine) / 2**20,
            }
            rows.append({"vocab": vocab, "tokens": n_tokens, "variant": variant,
                         "peak memory MiB": round(stats[variant]["peak_mib"], 1),
                         "peak / one model's fp32 logits": round(stats[variant]["peak_mib"] * 2**20 / logits_bytes, 3),
                         "step s (median)": round(stats[variant]["seconds"], 2), "runs": len(mine),
                         "loss": round(stats[variant]["loss"], 6)})
        figures = {
            "peak_mem_ratio": stats["fused"]["peak_mib"] / stats["today"]["peak_mib"],
            "time_ratio": stats["fused"]["seconds"] / stats["today"]["seconds"],
        }
        if "trl_gkd" in stats:
            figures.update(
                peak_mem_ratio_vs_default_chunk=stats["fused"]["peak_mib"] / stats["today_default_chunk"]["peak_mib"],
                time_ratio_vs_default_chunk=stats["fused"]["seconds"] / stats["today_default_chunk"]["seconds"],
                peak_mem_ratio_vs_trl=stats["fused"]["peak_mib"] / stats["trl_gkd"]["peak_mib"],
                time_ratio_vs_trl=stats["fused"]["seconds"] / stats["trl_gkd"]["seconds"],
            )
        summary[f"vocab {vocab}, {n_tokens} tokens"] = {
            **figures,
            "one_model_logits_mib": logits_bytes / 2**20,
            "max_loss_difference": max(abs(s["loss"] - stats["today"]["loss"]) for s in stats.values()),
            "max_maxrss_gap_before_step_mib": max(s["max_gap_mib"] for s in stats.values()),
        }
    meta.update(date_end=now(), load_average_end=load_average(),
                targets={"peak_mem_ratio": "<= 0.25", "time_ratio": "<= 1.10"})
    summary[f"profiled step, vocab {FUSED['vocabs'][0]}, {tokens} tokens"] = {
        f"{r['variant']} {k}": r[k] for r in profiled for k in ("matmul_seconds", "matmul_calls", "other_seconds")}
    return {"meta": meta, "rows": rows, "summary": summary, "runs": runs, "profiled": profiled}


# ------------------------------------------------------------------------------------------ cache
PRESET = "tinyshakespeare-gpt"
CACHE_TOPK = 64


def _lm_overrides(args: argparse.Namespace) -> list[str]:
    data = Path(args.data_root).resolve()
    return [
        "data.options.tokenizer=gpt2",
        f"data.options.tokenizer_path={data / 'gpt2-tokenizer'}",
        f"data.options.path={data / 'tinyshakespeare' / 'input.txt'}",
        f"data.train_subset={args.blocks}",
        "data.eval_batch_size=16",
        "teacher.gate.enabled=false",
        f"teacher.train.epochs={args.teacher_epochs}",
        f"train.epochs={args.student_epochs}",
        f"threads={args.threads}",
        "evaluate.latency=false",
    ]


def _epoch_seconds(run: Path, stage: str) -> list[float]:
    history = json.loads((run / "stages" / stage / "result.json").read_text())["history"]
    return [h["epoch_seconds"] for h in history]


def part_cache(args: argparse.Namespace, hard: float = 0.0) -> dict:
    """The token-level teacher cache on a real tokenizer: a GPT student distilled from the top-64 of
    its teacher's next-token distribution (cached once) against the same student alone and the same
    student distilled from the live teacher, same steps.

    ``hard`` > 0 (part ``cache_hard``): both distilled students' objective is ``hard`` x token CE on
    the labels + (1 - ``hard``) x forward KL, instead of the preset's forward KL alone; the teacher and
    its cache are part ``cache``'s."""
    import distill
    from distill.cli import main as cli
    from distill.recipes import load_recipe

    meta = {"machine": machine(args.threads), "date_start": now(), "load_average_start": load_average()}
    work = Path(args.work) / "cache"
    work.mkdir(parents=True, exist_ok=True)
    base = _lm_overrides(args)
    weights = work / "teacher" / "teacher.safetensors"
    if not weights.is_file():  # the teacher, trained once by distill run (no students)
        distill.run_recipe(load_recipe(PRESET, base + ["baseline.enabled=false", "distill.enabled=false"]),
                           work / "teacher", overwrite=True, progress=False)
    loaded = base + [f"teacher.weights={weights}"]
    arms = ("cached", "live")
    if hard:
        loaded += [f"distill.terms=[{{name: ce, loss: token_ce, weight: {hard}}}, "
                   f"{{name: kd, loss: token_fkl, weight: {1 - hard}}}]"]
        arms = (f"cached-hard{hard}", f"live-hard{hard}")
    recipe_file = work / "cache-recipe.yaml"
    recipe_file.write_text(load_recipe(PRESET, loaded + [f"teacher.cache_topk={CACHE_TOPK}"])
                           .model_dump_json(exclude_none=True))
    cache = work / "teacher-cache"
    started = time.perf_counter()
    if hard and (cache / "header.json").is_file():
        build_seconds = None  # cache_hard reuses part cache's (the runs check its fingerprint)
    else:
        if cli(["cache", str(recipe_file), "--out", str(cache)]) != 0:
            raise SystemExit("distill cache failed")
        build_seconds = time.perf_counter() - started
    header = json.loads((cache / "header.json").read_text())
    size = sum(f.stat().st_size for f in cache.iterdir())
    cached = distill.run_recipe(load_recipe(PRESET, loaded + [f"teacher.cache={cache}", f"teacher.cache_topk={CACHE_TOPK}"]),
                                work / arms[0], overwrite=True, progress=False)
    live = distill.run_recipe(load_recipe(PRESET, loaded + ["baseline.enabled=false"]), work / arms[1],
                              overwrite=True, progress=False)
    seconds = {"alone": _epoch_seconds(work / arms[0], "baseline-seed0"),
               "distilled, cached top-64": _epoch_seconds(work / arms[0], "student-seed0"),
               "distilled, live teacher": _epoch_seconds(work / arms[1], "student-seed0")}
    runs = {"alone": cached.baseline, "distilled, cached top-64": cached.student, "distilled, live teacher": live.student}
    rows = [{"student": name, "perplexity": role.metric("perplexity"), "token accuracy %": 100 * role.metric("accuracy"),
             "agreement %": 100 * role.metric("agreement"), "epoch s (median)": statistics.median(seconds[name]),
             "epochs": len(seconds[name])} for name, role in runs.items()]
    alone_s = statistics.median(seconds["alone"])
    ppl_cached, ppl_live = cached.student.metric("perplexity"), live.student.metric("perplexity")
    summary = {
        "cached_vs_alone": statistics.median(seconds["distilled, cached top-64"]) / alone_s,
        "live_vs_alone": statistics.median(seconds["distilled, live teacher"]) / alone_s,
        "ppl_cached": ppl_cached, "ppl_live": ppl_live,
        "ppl_relative_difference": abs(ppl_cached - ppl_live) / ppl_live,
        "ppl_alone": cached.baseline.metric("perplexity"), "ppl_teacher": cached.teacher.metric("perplexity"),
        "bytes_per_token": size / header["tokens"], "cache_tokens": header["tokens"],
        "cache_mib": size / 2**20, **({} if build_seconds is None else {"cache_build_seconds": build_seconds}),
    }
    meta.update(
        date_end=now(), load_average_end=load_average(),
        config={"data": "tinyshakespeare, GPT-2 BPE", "vocab": header["fingerprint"]["about"]["vocab"],
                "training blocks": args.blocks, "block tokens": 64, "preset": PRESET,
                "teacher": "gpt 4 x 128", "teacher epochs": args.teacher_epochs, "student": "gpt 2 x 64",
                "student epochs": args.student_epochs,
                "loss": f"{hard} token_ce + {1 - hard:g} token_fkl, T 1" if hard else "token_fkl, T 1",
                "cache": f"top-{CACHE_TOPK}, fp16"},
        variants={"timing": "median epoch time of each stage over its epochs, stages one after the other (not "
                            "interleaved); the cache's build is not in the epoch time (cache_build_seconds)"},
        targets={"cached_vs_alone": "<= 1.10", "ppl_relative_difference": "<= 0.01"},
    )
    return {"meta": meta, "rows": rows, "summary": {"cache_hard" if hard else "cache": summary}}


def part_cache_steps(args: argparse.Namespace) -> dict:
    """The cost of a training step, interleaved: the student alone (token CE), distilled from the
    cache of part ``cache`` (token_fkl on its top-64) and from the live teacher, in rounds of
    ``STEPS`` steps each, the order rotated every round, all in one process (the median per-step
    time of each arm; their ratios are the figure, free of the load drifting between stages)."""
    import torch

    from distill import Distiller, Term
    from distill.recipes import load_recipe
    from distill.signals import LiveTeacher
    from distill.stage import open_cache
    from distill.tasks.base import get_task

    meta = {"machine": machine(args.threads), "date_start": now(), "load_average_start": load_average()}
    torch.set_num_threads(args.threads)
    work = Path(args.work) / "cache"
    weights, cache = work / "teacher" / "teacher.safetensors", work / "teacher-cache"
    if not cache.is_dir():
        raise SystemExit("run the part `cache` first: it trains the teacher and builds the cache")
    recipe = load_recipe(PRESET, _lm_overrides(args) + [f"teacher.weights={weights}", f"teacher.cache={cache}",
                                                         f"teacher.cache_topk={CACHE_TOPK}"])
    task = get_task(recipe.task)
    prepared = task.prepare(recipe, None)
    teacher = task.build_model(recipe.teacher, prepared, 0)
    signals = {"alone": None, "cached top-64": open_cache(recipe, task, teacher, prepared, cache),
               "live teacher": LiveTeacher(teacher, feed=task.feed)}
    terms = {"alone": [Term("ce", "token_ce")], "cached top-64": [Term("kd", "token_fkl")],
             "live teacher": [Term("kd", "token_fkl")]}
    loader = task.train_loader(recipe, prepared, recipe.train.batch_size, 0)
    batches = list(loader)
    arms = {}
    for name in signals:
        student = task.build_model(recipe.student, prepared, 0)
        distiller = Distiller(student, signals[name], terms=terms[name], feed=task.feed)
        distiller.dry_run(batches[0])
        arms[name] = (distiller, torch.optim.AdamW(distiller.parameters(), lr=1e-3))
    names, times, cursor = list(arms), {name: [] for name in arms}, 0
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            distiller, optimizer = arms[name]
            for _ in range(STEPS):
                batch = batches[cursor % len(batches)]
                cursor += 1
                started = time.perf_counter()
                loss = distiller(batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [{"arm": name, "step s (median)": median[name], "steps": len(times[name]),
             "vs alone": median[name] / median["alone"]} for name in names]
    # where the difference goes: the loss alone (forward and backward) on one batch's student logits
    from distill.losses import get_loss

    batch = batches[0]
    with torch.no_grad():
        logits = arms["alone"][0].student(batch["input"].long())
        logits = getattr(logits, "logits", logits)
    top = signals["cached top-64"].outputs(batch)["logits"]
    ce, fkl = get_loss("token_ce").fn, get_loss("token_fkl").fn
    loss_times = {"token_ce (labels)": [], "token_fkl (cached top-64)": []}
    for _ in range(args.rounds):
        for name, fn in (("token_ce (labels)", lambda z: ce(z, batch["target"])), ("token_fkl (cached top-64)", lambda z: fkl(z, top))):
            z = logits.detach().clone().requires_grad_(True)
            started = time.perf_counter()
            fn(z).backward()
            loss_times[name].append(time.perf_counter() - started)
    for name, values in loss_times.items():
        rows.append({"arm": f"loss only: {name}", "step s (median)": statistics.median(values), "steps": len(values),
                     "vs alone": statistics.median(values) / median["alone"]})
    meta.update(date_end=now(), load_average_end=load_average(),
                config={"batch": recipe.train.batch_size, "block tokens": 64, "vocab": prepared.vocab_size,
                        "rounds": args.rounds, "steps per round": STEPS, "student": "gpt 2 x 64", "teacher": "gpt 4 x 128"},
                targets={"cached_vs_alone": "<= 1.10"})
    return {"meta": meta, "rows": rows,
            "summary": {"steps": {"cached_vs_alone": median["cached top-64"] / median["alone"],
                                  "live_vs_alone": median["live teacher"] / median["alone"]}}}


STEPS = 5  # steps per arm and round in part cache_steps


# ------------------------------------------------------------------------------------------ fsdp
def part_fsdp(args: argparse.Namespace) -> dict:
    """FSDP: a 2-process (gloo, CPU) sharded distillation run against the same run on 1 process."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from fsdp_equality import measure

    meta = {"machine": machine(args.threads), "date_start": now(), "load_average_start": load_average()}
    figures = measure(epochs=3)
    meta.update(date_end=now(), load_average_end=load_average(),
                variants={"command": "python benchmarks/fsdp_equality.py --epochs 3 (through lm_scale.py fsdp)"})
    shown = {k: v for k, v in figures.items() if isinstance(v, (int, float, str))}
    return {"meta": meta, "rows": [], "summary": {"fsdp": shown}, "raw": figures}


RECIPE_VARIANTS = ("plain-live", "fused-live", "plain-cached", "fused-cached")


def fused_recipe_worker(variant: str, tokens: int, args: argparse.Namespace) -> dict:
    """Part ``fused_recipe``'s worker: the preset's distilled stage built as ``distill run`` builds it
    (``fused_head`` on or off; live teacher or part ``cache``'s cache), ``tokens`` tokens a batch; the
    first step's peak memory, the next steps' median time."""
    import torch

    from distill.allocator import keep_freed_memory
    from distill.recipes import load_recipe
    from distill.stage import build_stage, live_signal, open_cache
    from distill.tasks.base import get_task

    torch.set_num_threads(args.threads)
    if args.malloc == "trainer":
        keep_freed_memory()
    head, source = variant.split("-")
    work = Path(args.work) / "cache"
    weights, cache = work / "teacher" / "teacher.safetensors", work / "teacher-cache"
    if not (cache / "header.json").is_file():
        raise SystemExit("run the part `cache` first: it trains the teacher and builds the cache")
    overrides = _lm_overrides(args) + [f"teacher.weights={weights}", f"task_options.fused_head={head == 'fused'}",
                                       f"train.batch_size={tokens // 64}"]
    if source == "cached":
        overrides += [f"teacher.cache={cache}", f"teacher.cache_topk={CACHE_TOPK}"]
    recipe = load_recipe(PRESET, overrides)
    task = get_task(recipe.task)
    prepared = task.prepare(recipe, None)
    teacher = task.build_model(recipe.teacher, prepared, 0)
    signal = open_cache(recipe, task, teacher, prepared, cache) if source == "cached" else live_signal(recipe, task, teacher)
    student = task.build_model(recipe.student, prepared, 0)
    stage = build_stage(recipe, task, prepared, name="student-seed0", student=student, teacher=signal,
                        spec=recipe.distill, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for batch in stage.loader:
        batches.append(stage.transform(batch, generator) if stage.transform else batch)
        if len(batches) == 1 + RECIPE_STEPS:
            break
    optimizer = torch.optim.AdamW(stage.distiller.parameters(), lr=1e-3)

    def step(batch) -> float:
        loss = stage.distiller(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    rss, before = _rss_bytes(), _maxrss_bytes()
    value = step(batches[0])
    after = _maxrss_bytes()
    times = []
    for batch in batches[1:]:
        started = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - started)
    return {"variant": variant, "tokens": tokens, "vocab": prepared.vocab_size, "loss": value,
            "seconds": statistics.median(times), "peak_bytes": after - rss, "maxrss_gap_before_bytes": before - rss,
            "load_average": load_average()}


def part_fused_recipe(args: argparse.Namespace) -> dict:
    """``task_options.fused_head`` at the recipe level: see the module's docstring."""
    meta = {"machine": machine(args.threads), "date_start": now(), "load_average_start": load_average()}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    records: dict[str, list[dict]] = {v: [] for v in RECIPE_VARIANTS}
    for r in range(args.recipe_repeats):
        for variant in RECIPE_VARIANTS[r % 4:] + RECIPE_VARIANTS[:r % 4]:  # interleaved, the order rotated
            out = subprocess.run(
                [sys.executable, __file__, "--worker", "fused_recipe", variant, "0", str(args.recipe_tokens),
                 "--threads", str(args.threads), "--malloc", args.malloc, "--work", args.work,
                 "--data-root", args.data_root, "--blocks", str(args.blocks)],
                capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"worker {variant} failed:\n{out.stderr[-3000:]}")
            record = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {variant:13s}: {record['peak_bytes'] / 2**20:7.0f} MiB, step {record['seconds']:.2f} s, "
                  f"gap before {record['maxrss_gap_before_bytes'] / 2**20:.0f} MiB, load {record['load_average'][0]}",
                  flush=True)
            records[variant].append(record)
    vocab = records["plain-live"][0]["vocab"]
    logits_mib = args.recipe_tokens * vocab * 4 / 2**20
    med = {v: {"peak": statistics.median(x["peak_bytes"] for x in recs) / 2**20,
               "seconds": statistics.median(x["seconds"] for x in recs),
               "gap": max(x["maxrss_gap_before_bytes"] for x in recs) / 2**20} for v, recs in records.items()}
    rows = [{"variant": v, "peak memory MiB": round(m["peak"], 1), "peak / one model's fp32 logits": round(m["peak"] / logits_mib, 3),
             "step s (median)": round(m["seconds"], 3), "largest maxrss gap before MiB": round(m["gap"], 1)}
            for v, m in med.items()]
    summary = {source: {"peak_mem_ratio": med[f"fused-{source}"]["peak"] / med[f"plain-{source}"]["peak"],
                        "time_ratio": med[f"fused-{source}"]["seconds"] / med[f"plain-{source}"]["seconds"]}
               for source in ("live", "cached")}
    meta.update(date_end=now(), load_average_end=load_average(),
                config={"preset": PRESET, "tokens per batch": args.recipe_tokens, "vocab": vocab,
                        "one model's fp32 logits MiB": round(logits_mib, 1), "repeats": args.recipe_repeats,
                        "timed steps per repeat": RECIPE_STEPS, "student": "gpt 2 x 64", "teacher": "gpt 4 x 128",
                        "loss": "token_fkl, T 1"},
                variants={"plain": "task_options.fused_head false: the models' full logits, then the token loss",
                          "fused": "task_options.fused_head true: hidden states and output layers, logits chunk by chunk in the loss",
                          "live / cached": "the teacher run beside the student, or part cache's top-64 cache"})
    return {"meta": meta, "rows": rows, "summary": summary}


RECIPE_STEPS = 3  # part fused_recipe: steps timed after the first (measured) one


PARTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "fused": part_fused, "cache": part_cache, "cache_hard": lambda args: part_cache(args, hard=HARD),
    "cache_steps": part_cache_steps, "fused_recipe": part_fused_recipe, "fsdp": part_fsdp}
HARD = 0.5  # part cache_hard: the token CE's weight beside forward KL


# ------------------------------------------------------------------------------------------ results
def merge(new: dict[str, dict], path: Path = JSON_PATH) -> dict:
    """Read the results file, replace the parts in ``new``, keep the others, write it back."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(new)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(data: dict) -> str:
    """``lm_scale.md``: for each part, how it was measured, its table and its summary."""
    lines = ["# LM distillation at scale", "",
             ("Made by `python benchmarks/lm_scale.py [PART ...]` from [lm_scale.json](lm_scale.json); "
              "each part was measured on its own date and machine, stated with it."), ""]
    for name in sorted(data):
        part = data[name]
        meta = part.get("meta", {})
        m = meta.get("machine", {})
        lines += [f"## {name}", ""]
        lines.append(
            f"{m.get('processor', '?')}, {m.get('cpus', '?')} CPUs, {m.get('threads', '?')} torch thread(s), "
            f"torch {m.get('torch', '?')}, {meta.get('date_start', '?')} to {meta.get('date_end', '?')}, load average "
            f"{meta.get('load_average_start', '?')} at the start and {meta.get('load_average_end', '?')} at the end."
        )
        if "config" in meta:
            lines += ["", "Configuration: " + ", ".join(f"{k} {_cell(v) if not isinstance(v, list) else v}"
                                                       for k, v in meta["config"].items()) + "."]
        for key, text in meta.get("variants", {}).items():
            lines.append(f"- `{key}`: {text}")
        rows = part.get("rows", [])
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        for key, figures in part.get("summary", {}).items():
            shown = figures if isinstance(figures, dict) else {key: figures}
            lines += ["", f"**{key}**: " + ", ".join(f"{k} {_cell(v)}" for k, v in shown.items())]
        if meta.get("targets"):
            lines += ["", "Targets: " + ", ".join(f"{k} {v}" for k, v in meta["targets"].items())]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("parts", nargs="*", help=f"parts to run (default: all): {', '.join(PARTS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                        help="cache: a folder with tinyshakespeare/input.txt and gpt2-tokenizer/")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "runs" / "lm_scale"), help="cache: run folders")
    parser.add_argument("--blocks", type=int, default=1500, help="cache: training blocks of 64 tokens")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--student-epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6, help="cache_steps: interleaved rounds")
    parser.add_argument("--malloc", choices=("trainer", "default"), default="trainer",
                        help="glibc malloc as distill's trainer tunes it on the CPU (default), or left alone")
    parser.add_argument("--recipe-tokens", type=int, default=4096, help="fused_recipe: tokens a batch (64 a block)")
    parser.add_argument("--recipe-repeats", type=int, default=3, help="fused_recipe: fresh processes per variant")
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=4, metavar=("PART", "VARIANT", "VOCAB", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        part, variant, vocab, tokens = args.worker
        if part == "fused_recipe":
            print(json.dumps(fused_recipe_worker(variant, int(tokens), args)))
            return
        if part != "fused":
            raise SystemExit(f"no worker for part {part!r}")
        print(json.dumps(fused_worker(variant, int(vocab), int(tokens), args.threads, args.profile, args.malloc)))
        return
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}")
    new = {}
    for name in args.parts or list(PARTS):
        print(f"part {name}", flush=True)
        new[name] = PARTS[name](args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = merge(new)
    MD_PATH.write_text(render(data))
    print(MD_PATH.read_text())


if __name__ == "__main__":
    main()
