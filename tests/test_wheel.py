"""A built wheel, installed into a fresh virtual environment, runs an MLLM rerank stage: its prompts and templates
travel as package data."""

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_in_a_fresh_venv_runs_a_rerank_stage(tmp_path, mllm_dir, clip_dir, world_dir):
    wheels = tmp_path / "wheels"
    import importlib.util

    # Without isolation where setuptools is at hand (fast, offline); else pip fetches the build backend itself.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("genret-*.whl")
    venv = tmp_path / "venv"
    # The heavy dependencies (torch, transformers) come from this environment through a .pth line (which runs none
    # of its .pth files, so not genret's editable install); genret itself only from the wheel, run outside the checkout.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site,
                    str(wheel)], check=True, capture_output=True, timeout=600)
    script = textwrap.dedent(f"""
        import genret, genret.prompts
        from genret.data import load_dataset
        from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
        from genret.types import Query
        assert "site-packages" in genret.__file__, genret.__file__
        assert (genret.prompts.PROMPT_DIR / "rerank_pointwise.toml").is_file(), genret.prompts.PROMPT_DIR
        stages = ({{"type": "prefilter", "k": 3}},
                  {{"type": "rerank", "mode": "pointwise", "model": {str(mllm_dir)!r}, "k": 3}})
        pipe = RetrievalPipeline(PipelineConfig(name="w", encoder=EncoderConfig(model={str(clip_dir)!r}), stages=stages))
        test = load_dataset({str(world_dir)!r}).split("test")
        pipe.index(test, progress=False)
        ranking = pipe.search(Query(id="q", text=test.records[0].captions[0]), k=3)[0]
        assert len(ranking.candidates) == 3 and all("rerank" in c.scores for c in ranking.candidates)
        print("ok", genret.prompts.PROMPT_DIR)
    """)
    out = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "genret/_prompts" in out.stdout
