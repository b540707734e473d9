"""Every command the README, docs/ and bench/RESULTS.md show runs as written: `ctrefine ...` (and the launcher's
`--module ctrefine.train ...`) parses with the CLI's own parser, `python bench/X.py --flag` names a script that
exists and flags it has, `make X` a target of the Makefile."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from ctrefine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md"]
STARTS = ("ctrefine ", "python bench/", "deepspeed ", "make ")


def _spans(text: str) -> list[str]:
    """Inline code spans and the lines of fenced shell blocks."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        out += [ln.split(" #")[0].strip() for ln in block.splitlines()]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return out + re.findall(r"`([^`\n]+)`", text)


def _commands(text: str) -> list[str]:
    cmds = []
    for span in _spans(text):
        for part in re.split(r";\s|\s&&\s", span):
            part = re.sub(r"^(\w+=\S+\s+)+", "", part.strip())  # VAR=value prefixes
            if part.startswith(STARTS) and len(part.split()) > 2:  # `ctrefine prepare` names a command in prose
                cmds.append(part)
    return cmds


def _normalise(cmd: str) -> list[str]:
    """Optional ``[...]`` groups left out, ``a\\|b`` alternatives reduced to the first."""
    while re.search(r"\[[^\[\]]*\]", cmd):
        cmd = re.sub(r"\s*\[[^\[\]]*\]", "", cmd)
    cmd = re.sub(r"(\S+?)(\\\|\S+)+", lambda m: m.group(1), cmd)
    return shlex.split(cmd)


def _check(cmd: str) -> str | None:
    """Why ``cmd`` would not run as written, or None."""
    words = _normalise(cmd)
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        return None if words[1] in targets else f"no make target {words[1]!r}"
    if words[0] == "python":
        script = ROOT / words[1]
        if not script.is_file():
            return f"no script {words[1]}"
        source = script.read_text()
        missing = [w.split("=")[0] for w in words[2:]
                   if w.startswith("--") and w != "--help" and w.split("=")[0] not in source]
        return f"{words[1]} has no option {missing}" if missing else None
    if words[0] == "deepspeed":
        if "--module" not in words or words[words.index("--module") + 1] != "ctrefine.train":
            return "a launcher command that does not run ctrefine.train"
        words = ["ctrefine", "train", *words[words.index("--module") + 2:]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(words[1:])
        except SystemExit as exc:
            if exc.code:
                return err.getvalue().strip().splitlines()[-1]
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_shown_runs(doc):
    cmds = _commands(doc.read_text())
    assert cmds or doc.name != "commands.md"
    bad = [f"{c}\n    -> {why}" for c in cmds if (why := _check(c))]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_what_would_not_run():
    assert _check("ctrefine infer --no-such-flag 1") and _check("ctrefine trian base --config full")
    assert _check("python bench/quality.py --no-such-flag") and _check("python bench/nothing.py")
    assert _check("make nothing") and _check("deepspeed --num_gpus 2 --module other.module")
    assert _check("ctrefine make-data --out d --num-patients 4 [--seed 0 --size 64]") is None
    assert _check("ctrefine infer --xray-pa a.png --xray-lateral b.png --out ct.nii.gz --format nifti\\|dicom") is None
