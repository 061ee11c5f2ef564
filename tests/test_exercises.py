"""The classroom exercises (exercises.py): for every registered exercise the blank stub fails, the
reference passes, and each planted known mistake fails with its own diagnostic; the markers in the
modules match the registry; and the command line works end to end (start -> check -> fill in ->
check -> grade --json), with clear answers to bad input.

Checks run in this process (exercises.run_checks swaps the workspace's modules in and back out); the
command-line tests run `check` for real, in its own process, in temporary workspaces (never the
repository's lab/).
Run: pytest tests/test_exercises.py -q
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, hf_available, hf_config, tiny_args

sys.path.insert(0, str(ROOT))
import exercises as E  # noqa: E402

ALL = list(E.EXERCISES.values())


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(3), "little")


def make_lab(tmp_path: Path, started: list[str]) -> Path:
    """A workspace holding the reference modules, with `started` marked as started."""
    lab = tmp_path / "lab"
    lab.mkdir(parents=True)
    for m in E.project_modules():
        shutil.copy2(ROOT / f"{m}.py", lab / f"{m}.py")
    E._save_state(lab, {"started": started, "hints": {}})
    return lab


def plant(lab: Path, ex: E.Exercise, mistake: E.Mistake) -> None:
    """Apply the mistake's edits inside the region of lab/FILE; each edit must hit the region
    exactly once."""
    lines = (lab / ex.file).read_text().splitlines(keepends=True)
    first, end, _ = E.find_region(lines, ex.name, ex.file)
    region = "".join(lines[first:end])
    for old, new in mistake.edits:
        assert region.count(old) == 1, (f"{ex.name}: {mistake.description!r}: {old!r} not once "
                                        f"in the region")
        assert new != old
        region = region.replace(old, new)
    (lab / ex.file).write_text("".join(lines[:first]) + region + "".join(lines[end:]))


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if not r["passed"] and not r["skipped"]]


# ------------------------------------------------------------------------------------------------
# Every registered exercise


@pytest.mark.parametrize("ex", ALL, ids=[e.name for e in ALL])
def test_reference_passes(ex, tmp_path):
    seed = fresh_seed()
    results = E.run_checks(ex, make_lab(tmp_path, [ex.name]), seed)
    assert not failures(results), f"seed {seed}: {failures(results)}"


@pytest.mark.parametrize("ex", ALL, ids=[e.name for e in ALL])
def test_blank_stub_fails_every_check(ex, tmp_path):
    lab = make_lab(tmp_path, [])
    E.start(ex, lab)
    results = E.run_checks(ex, lab, fresh_seed())
    assert all(not r["passed"] for r in results)
    assert all("NotImplementedError" in r["message"] or r["skipped"] for r in results), results


@pytest.mark.parametrize("ex", ALL, ids=[e.name for e in ALL])
def test_each_known_mistake_fails_with_its_diagnostic(ex, tmp_path):
    assert len(ex.mistakes) >= 2, f"{ex.name}: every exercise needs at least two known mistakes"
    for i, mistake in enumerate(ex.mistakes):
        lab = make_lab(tmp_path / str(i), [ex.name])
        plant(lab, ex, mistake)
        seed = fresh_seed()
        results = E.run_checks(ex, lab, seed)
        assert failures(results), f"{ex.name}: planted {mistake.description!r} passes (seed {seed})"
        messages = "\n".join(r["message"] for r in results)
        assert mistake.description in messages, (f"seed {seed}: {mistake.description!r} not "
                                                 f"in:\n{messages}")


@pytest.mark.parametrize("ex", ALL, ids=[e.name for e in ALL])
def test_exercise_is_complete(ex):
    assert ex.file in {f"{m}.py" for m in E.project_modules()}
    assert ex.statement.strip() and ex.against and ex.minutes > 0
    assert all(c.__doc__ and c.__name__.startswith("check_") for c in ex.checks), (
        "check_* + docstring")
    assert len({m.description for m in ex.mistakes}) == len(ex.mistakes)


def test_markers_in_the_repository_match_the_registry():
    assert E.marker_problems() == []


def test_broken_markers_are_reported(tmp_path):
    ex = ALL[0]
    for m in E.project_modules():
        shutil.copy2(ROOT / f"{m}.py", tmp_path / f"{m}.py")
    path = tmp_path / ex.file
    good = path.read_text()
    assert E.marker_problems(tmp_path) == []
    start, end = f"# exercise: {ex.name}\n", f"# end exercise: {ex.name}\n"
    path.write_text(good.replace(end, ""))                                    # the end marker lost
    assert any(ex.name in p and "found 1 and 0" in p for p in E.marker_problems(tmp_path))
    path.write_text(good.replace(start, "", 1).replace(end, ""))              # the region is gone
    assert any("found 0 and 0" in p for p in E.marker_problems(tmp_path))
    # a second start marker
    path.write_text(good + start)
    assert any("found 2 and 1" in p for p in E.marker_problems(tmp_path))
    path.write_text(good + "# exercise: no_such_exercise\n")                  # an unregistered name
    assert any("no_such_exercise" in p for p in E.marker_problems(tmp_path))


@hf_available
def test_rope_truth_matches_transformers():
    """The RoPE exercise's fp64 truth agrees with transformers' DeepseekV3
    apply_rotary_pos_emb_interleave (whose output is de-interleaved: [re_0..re_n-1,
    im_0..im_n-1])."""
    import torch
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    g = torch.Generator().manual_seed(fresh_seed())
    B, T, H, Dr = 2, 5, 3, 12
    theta = torch.rand(T, Dr // 2, generator=g, dtype=torch.float64) * 50
    x = torch.randn(B, T, H, Dr, generator=g, dtype=torch.float64)
    # (1, T, Dr)
    cos, sin = (f(torch.cat([theta, theta], -1))[None] for f in (torch.cos, torch.sin))
    # (B, H, T, Dr)
    ref, _ = apply_rotary_pos_emb_interleave(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    # de-interleaved
    ours = E.rope_truth(x, theta).unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
    torch.testing.assert_close(ours, ref.transpose(1, 2), rtol=0, atol=1e-12)


def test_expect_close_names_the_matching_mistake_else_the_worst_entry():
    import torch
    want = torch.zeros(2, 3)
    E.expect_close(want + 1e-7, want, "x", atol=1e-6)
    with pytest.raises(E.CheckFailed, match="known mistake: off by one"):
        E.expect_close(want + 1, want, "x", atol=1e-6,
                       mistakes={"off by two": want + 2, "off by one": want + 1})
    got = want.clone()
    got[1, 2] = 0.5
    with pytest.raises(E.CheckFailed,
                       match=r"max error 0.5 at index \(1, 2\).*none of the known mistakes"):
        E.expect_close(got, want, "x", atol=1e-6, mistakes={"off by one": want + 1})



def test_expect_same_names_every_matching_mistake_else_says_where():
    E.expect_same("abc", "abc", "x")
    with pytest.raises(E.CheckFailed, match="known mistake: one — or: two$"):
        E.expect_same("b", "a", "x", mistakes={"one": "b", "two": "b", "three": "c"})
    with pytest.raises(E.CheckFailed,
                       match="got 'c', expected 'a'; it matches none of the known mistakes"):
        E.expect_same("c", "a", "x", mistakes={"one": "b"})


def test_bpe_truth_equals_tiktoken_educational():
    """The bpe_merge truth against tiktoken's own readable trainer, on fresh random texts."""
    from tiktoken._educational import bpe_train
    import tokenizer as T
    lab = E.Lab(ROOT, fresh_seed())
    for _ in range(5):
        text = "".join(" ".join(w for w, _ in E._random_chunks(lab)) + "\n"
                       for _ in range(lab.randint(1, 4)))
        chunks = list(T.count_chunks(text).items())
        # tiktoken's trainer does not stop when the pairs run out: ask for at most what the text
        # can make
        n = min(256 + lab.randint(5, 60), len(E.bpe_truth(chunks, 10 ** 6)))
        # tiktoken's trainer splits with regex in V0 mode, so it gets the pattern with the
        # (?V1) prefix
        reference = bpe_train(text, n, "(?V1)" + T.PAT_STR, visualise=None)
        # no duplicate spelling: comparable
        assert sorted(reference.values()) == list(range(len(reference)))
        assert E.bpe_truth(chunks, n) == reference, f"seed {lab.seed}"


def test_chat_truth_equals_the_official_template():
    """The render_tool_call truth against Kimi-K2-Instruct-0905's chat_template.jinja as
    transformers renders it (the template needs every id written out, so the conversation gets the
    ids the truth makes up)."""
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")
    template = (ROOT / "tests" / "data" / "k2_instruct_0905.jinja").read_text(encoding="utf-8")
    lab = E.Lab(ROOT, fresh_seed())
    for _ in range(6):
        messages = E._random_conversation(lab, turns=lab.randint(1, 3), ids=True)
        n = 0
        for m in messages:
            for j, call in enumerate(m.get("tool_calls") or ()):
                call.setdefault("id", f"functions.{call['function']['name']}:{n + j}")
            n += len(m.get("tool_calls") or ())
        (hf,), _ = ctu.render_jinja_template(conversations=[messages], chat_template=template,
                                             add_generation_prompt=True)
        assert "".join(t for t, _, _ in E.chat_truth(messages)) == hf, f"seed {lab.seed}"


def test_wire_truth_reads_back_with_the_guides_regexes():
    """The parse_tool_calls truth's writer against the reference parser regexes of
    MoonshotAI/Kimi-K2 docs/tool_call_guidance.md (kept verbatim in tokenizer.py)."""
    import json
    import tokenizer as T
    calls = [("get_weather", 0, '{"city": "Zürich"}'), ("db.query", 3, '{"q": [1, {"a": null}]}')]
    (section,) = T.SECTION_RE.findall("Sure." + E.wire_truth(calls, "\n") + "after")
    found = [(m["tool_call_id"], json.loads(m["function_arguments"]))
             for m in T.OFFICIAL_CALL_RE.finditer(section)]
    assert found == [(f"functions.{n}:{i}", json.loads(a)) for n, i, a in calls]

# ------------------------------------------------------------------------------------------------
# The command line


def cli(capsys, *args: str) -> tuple[int, str]:
    """exercises.main in this process (`check` and `grade` still grade in a child): (exit code,
    output)."""
    rc = E.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


def region_of(lab: Path, ex: E.Exercise) -> tuple[list[str], int, int, str]:
    lines = (lab / ex.file).read_text().splitlines(keepends=True)
    first, end, indent = E.find_region(lines, ex.name, ex.file)
    return lines, first, end, indent


def write_region(lab: Path, ex: E.Exercise, body: str) -> int:
    """Replace the region of lab/FILE by `body` (lines, indented as the region); returns its first
    line."""
    lines, first, end, indent = region_of(lab, ex)
    new = [indent + s + "\n" for s in body.splitlines()]
    (lab / ex.file).write_text("".join(lines[:first] + new + lines[end:]))
    return first + 1


def tree_digest(root: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.glob("*.py")))).hexdigest()


@pytest.mark.slow
def test_flow_from_a_clean_copy(tmp_path):
    """start -> check fails -> region filled from `solution` -> check passes -> grade --json reports
    it; the repository copy's own files are unchanged and the workspace is its lab/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for p in ROOT.glob("*.py"):
        shutil.copy2(p, repo / p.name)
    before = tree_digest(repo)
    env = {k: v for k, v in os.environ.items() if k != E.LAB_ENV}

    def run(*args):
        p = subprocess.run([sys.executable, "exercises.py", *args], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr

    ex = E.EXERCISES["newton_schulz"]
    rc, out = run("start", ex.name)
    assert rc == 0 and f"lab/{ex.file}" in out, out
    rc, out = run("check", ex.name)
    assert rc == 1 and "FAIL" in out and "NotImplementedError" in out, out
    assert f"score 0/{len(ex.checks)}" in out
    assert f"lab/{ex.file}:" in out  # the student's own frame
    rc, solution = run("solution", ex.name)
    assert rc == 0
    lines, first, end, _ = region_of(repo / "lab", ex)
    (repo / "lab" / ex.file).write_text("".join(lines[:first]) + solution + "".join(lines[end:]))
    rc, out = run("check", ex.name)
    assert rc == 0 and "FAIL" not in out and "all checks pass" in out, out
    rc, out = run("grade", "--json", "class.json")
    assert rc == 0, out
    report = json.loads((repo / "class.json").read_text())
    (res,) = report["exercises"]
    assert res["exercise"] == ex.name and res["passed"] == res["total"] == len(ex.checks)
    assert res["score"] == 1.0
    assert all(set(c) >= {"name", "passed", "score", "message"} for c in res["checks"])
    assert report["changed_outside_regions"] == []
    assert tree_digest(repo) == before


def test_start_twice_keeps_the_students_work(tmp_path, capsys):
    ex, lab = E.EXERCISES["top_p"], tmp_path / "lab"
    assert cli(capsys, "start", ex.name, "--lab", str(lab))[0] == 0
    blank = (lab / ex.file).read_text()
    # untouched stub: nothing to lose
    assert cli(capsys, "start", ex.name, "--lab", str(lab))[0] == 0
    assert (lab / ex.file).read_text() == blank
    write_region(lab, ex, "logits = logits  # my attempt")
    mine = (lab / ex.file).read_text()
    rc, out = cli(capsys, "start", ex.name, "--lab", str(lab))
    assert rc == 2 and "--force" in out and "your work" in out
    assert (lab / ex.file).read_text() == mine
    assert cli(capsys, "start", ex.name, "--lab", str(lab), "--force")[0] == 0
    assert (lab / ex.file).read_text() == blank
    # starting another exercise in another file adds its stub and leaves this one alone
    assert cli(capsys, "start", "rope", "--lab", str(lab))[0] == 0
    assert ((lab / ex.file).read_text() == blank
            and "exercise rope" in (lab / "attention.py").read_text())
    assert (ROOT / ex.file).read_text().count("NotImplementedError") == 0


def test_bad_input_gets_a_clear_answer(tmp_path, capsys):
    rc, out = cli(capsys, "check", "roppe", "--lab", str(tmp_path / "lab"))
    assert rc == 2 and "unknown exercise 'roppe'" in out and all(n in out for n in E.EXERCISES)
    rc, out = cli(capsys, "check", "rope", "--lab", str(tmp_path / "lab"))
    assert rc == 2 and "python exercises.py start rope" in out
    rc, out = cli(capsys, "grade", "--lab", str(tmp_path / "lab"))
    assert rc == 2 and "start NAME" in out


def test_hints_come_one_per_call_and_solution_is_the_reference(tmp_path, capsys):
    ex, lab = E.EXERCISES["rope"], tmp_path / "lab"
    cli(capsys, "start", ex.name, "--lab", str(lab))
    for i, hint in enumerate(ex.hints):
        rc, out = cli(capsys, "hint", ex.name, "--lab", str(lab))
        assert rc == 0 and f"Hint {i + 1}/{len(ex.hints)}" in out and hint in out
    assert "No more hints" in cli(capsys, "hint", ex.name, "--lab", str(lab))[1]
    E.main(["solution", ex.name])
    assert capsys.readouterr().out == "".join(E.reference_region(ex))


def test_list_shows_every_exercise(capsys):
    rc, out = cli(capsys)
    assert rc == 0 and all(e.name in out and e.against in out for e in ALL)


def test_check_reports_the_students_syntax_error_and_exception_at_the_students_line(tmp_path):
    ex = E.EXERCISES["top_p"]
    lab = make_lab(tmp_path, [])
    E.start(ex, lab)
    line = write_region(lab, ex, "keep = (logits > 0")
    (r, *_) = E.run_checks(ex, lab, fresh_seed())
    assert "SyntaxError" in r["message"] and f"{ex.file}:{line}" in r["message"], r
    assert "keep = (logits > 0" in r["message"]

    line = write_region(lab, ex,
                        "probs = logits.softmax(-1)\nlogits = logits[:, probs.shape[1] * 2]")
    results = E.run_checks(ex, lab, fresh_seed())
    for r in results:
        assert "IndexError" in r["message"] and f"{ex.file}:{line + 1} in sample" in r["message"], r
        assert "logits = logits[:, probs.shape[1] * 2]" in r["message"]
        # no framework frames
        assert "Traceback" not in r["message"] and "exercises.py" not in r["message"]


@pytest.mark.slow
def test_grade_stops_an_infinite_loop_and_grades_the_exercises_after_it(tmp_path, capsys):
    loop, ok, lab = E.EXERCISES["top_p"], E.EXERCISES["newton_schulz"], tmp_path / "lab"
    cli(capsys, "start", loop.name, "--lab", str(lab))
    cli(capsys, "start", ok.name, "--lab", str(lab))
    write_region(lab, loop, "while True:\n    pass")
    write_region(lab, ok, "".join(E.reference_region(ok)).replace("\n    ", "\n").strip())
    rc, out = cli(capsys, "grade", "--lab", str(lab), "--timeout", "3", "--json",
                  str(tmp_path / "g.json"))
    assert rc == 1
    report = json.loads((tmp_path / "g.json").read_text())
    first, second = report["exercises"]
    assert first["exercise"] == loop.name and first["passed"] == 0
    assert all("stopped after 3 s" in c["message"] and "loops forever" in c["message"]
               for c in first["checks"])
    # a new process
    assert second["exercise"] == ok.name and second["passed"] == second["total"] > 0, second


def test_tour_follows_the_token_through_the_model_and_its_lines_point_at_the_code():
    lines = E.tour()
    table = lines[next(i for i, s in enumerate(lines) if s.startswith("----")) + 1:]
    steps = [s for s in table if ".py:" in s]
    order = ["embedding", "MLA attention", "RoPE on interleaved pairs", "router", "routed experts",
             "head", "sampler"]
    firsts = [next(i for i, s in enumerate(steps) if s.lstrip().startswith(w)) for w in order]
    assert firsts == sorted(firsts), steps
    defs = {"embedding": "def forward", "MLA attention": "def forward",
            "RoPE on interleaved": "def apply_rope",
            "router": "def forward", "routed experts": "def run_experts", "sampler": "def sample",
            "head": "self.lm_head(", "output projection": "self.o_proj("}
    for s in steps:
        label = s.strip()
        where = next(w for w in s.split() if ".py:" in w)
        file, line = where.split(":")
        code = (ROOT / file).read_text().splitlines()[int(line) - 1]
        for start, expected in defs.items():
            if label.startswith(start):
                assert expected in code, f"{label}: {where} is {code!r}"
    assert any("-> experts" in s for s in lines) and any("next token id" in s for s in lines)


def test_grade_names_files_changed_outside_the_regions(tmp_path):
    lab = make_lab(tmp_path, [])
    E.start(E.EXERCISES["rope"], lab)
    write_region(lab, E.EXERCISES["rope"], "return x  # inside the region: not reported")
    assert E.changed_outside_regions(lab) == []
    (lab / "config.py").write_text((lab / "config.py").read_text() + "\nCHEAT = 1\n")
    assert E.changed_outside_regions(lab) == ["config.py"]


def test_the_command_line_knows_every_registered_exercise():
    """A register() placed after the `if __name__ == "__main__"` block would be missing from the
    CLI."""
    out = subprocess.run([sys.executable, str(ROOT / "exercises.py"), "list"], capture_output=True,
                         text=True, timeout=60).stdout
    assert all(f"\n{name} " in out for name in E.EXERCISES), out


# ------------------------------------------------------------------------------------------------
# The exercises' own truths against transformers' DeepseekV3
# (the checks never import transformers: too slow)

# Kimi-K2-Instruct config.json
K2_YARN = {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
           "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
DSV3_YARN = dict(K2_YARN, factor=40.0, beta_fast=32.0)                # DeepSeek-V3 config.json


@hf_available
@pytest.mark.parametrize("theta,rs,max_pos", [
    (50000.0, K2_YARN, 131072), (10000.0, DSV3_YARN, 163840),
    (1e6, dict(DSV3_YARN, factor=8.0, beta_fast=16.0, beta_slow=2.0, mscale_all_dim=0.7,
               truncate=False), 32768),
], ids=["k2", "deepseek-v3", "unrounded"])
def test_yarn_truths_match_transformers(theta, rs, max_pos):
    """yarn_truth = transformers' YaRN inv_freq (_compute_yarn_parameters) and scale_truth = its
    attention scaling, on the K2 and DeepSeek-V3 rope settings and head dims (Dn 128, Dr 64)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    args = tiny_args("k2", qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                     rope_theta=theta, rope_scaling=rs, max_position_embeddings=max_pos)
    cfg = hf_config(args)
    inv_freq, _ = _compute_yarn_parameters(cfg)
    want = E.yarn_truth(64, theta, 4096, rs["factor"], rs["beta_fast"], rs["beta_slow"],
                        rs.get("truncate", True))
    torch.testing.assert_close(want, inv_freq.double(), rtol=1e-6, atol=0)
    assert abs(E.scale_truth(128, 64, rs).item()
               - hf_mod.DeepseekV3Attention(cfg, 0).scaling) < 1e-9


@hf_available
@pytest.mark.parametrize("kind", ["k2", "moonlight"])
def test_mla_truth_matches_transformers_attention(kind):
    """mla_truth (fp64, from the equations) = transformers' DeepseekV3Attention (eager, fp32, causal
    mask) with the same random weights, on 90 tokens (beyond original_max_position_embeddings
    64)."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_mod

    args = tiny_args(kind)
    cfg = hf_config(args)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = hf_mod.DeepseekV3Attention(cfg, 0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
    B, S = 2, 90
    x = torch.randn(B, S, args.hidden_size, generator=g)
    rotary = hf_mod.DeepseekV3RotaryEmbedding(cfg)
    # cos/sin unscaled, so the angles below are all of RoPE
    assert rotary.attention_scaling == 1.0
    cos_sin = rotary(x, torch.arange(S)[None])
    mask = torch.zeros(S, S).masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        ref = attn(x, cos_sin, mask[None, None])[0]
    theta = torch.arange(S, dtype=torch.float64)[:, None] * rotary.inv_freq.double()
    dims = (args.num_attention_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim,
            args.kv_lora_rank)
    scale = E.scale_truth(args.qk_nope_head_dim, args.qk_rope_head_dim, args.rope_scaling).item()
    want = E.mla_truth(dict(attn.state_dict()), x, theta, dims, scale)[0]
    torch.testing.assert_close(ref.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    # the test can fail
    wrong = E.mla_truth(dict(attn.state_dict()), x, theta, dims, scale, causal=False)[0]
    assert (ref.double() - wrong).abs().max() > 1e-2 * want.abs().max()


@pytest.mark.parametrize("n_group, topk_group", [(1, 1), (4, 2), (2, 1)])
def test_router_truth_matches_transformers(n_group, topk_group):
    """exercises.router_truth routes as transformers' DeepseekV3TopkRouter (which masks with
    -inf)."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    gen = torch.Generator().manual_seed(fresh_seed())
    N, D, n_exp, K, scale = 64, 24, 32, 6, 2.827
    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=n_exp, num_experts_per_tok=K,
                           n_group=n_group, topk_group=topk_group, norm_topk_prob=True,
                           routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(cfg)
    W, bias = (torch.randn(n_exp, D, generator=gen) / D ** 0.5,
               0.1 * torch.randn(n_exp, generator=gen))
    x = torch.randn(N, D, generator=gen)
    with torch.no_grad():
        router.weight.copy_(W)
        router.e_score_correction_bias.copy_(bias)
        _, weights, idx = router(x)
    dense, scores, margin = E.router_truth(x, W, bias, K, n_group, topk_group, scale)
    # HF's top-k is unsorted
    hf = torch.zeros(N, n_exp, dtype=torch.float64).scatter(1, idx, weights.double())
    # fp32 may order a near-tie differently: leave those out
    ok = margin > 1e-4
    assert ok.sum() > N // 2
    torch.testing.assert_close(hf[ok], dense[ok], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.double().matmul(W.double().T).sigmoid(), scores, atol=0, rtol=0)
