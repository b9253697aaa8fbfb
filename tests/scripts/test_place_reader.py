"""scripts/place_reader.py: a small reader of where each object is, on an MLLM's frozen image tokens."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "place_reader.py"


def test_each_object_is_asked_about_with_its_true_place(world):
    from genret.world.scene import Scene

    script = load_script("place_reader")
    records = world.split("val").records[:10]
    rows, asked, other, place = script.questions(records)
    assert len(rows) == 2 * len(records) and rows.tolist() == [i for i in range(len(records)) for _ in (0, 1)]
    for k, i in enumerate(rows.tolist()):
        scene = Scene.from_dict(records[i].meta["scene"])
        a, b = scene.objects
        first = k % 2 == 0
        assert torch.equal(asked[k], script.name_vector(a if first else b))
        assert torch.equal(other[k], script.name_vector(b if first else a))
        want = scene.relation if first else {"left of": "right of", "right of": "left of", "above": "below",
                                             "below": "above"}[scene.relation]
        assert script.PLACES[place[k]] == want


def synthetic(n: int, seed: int, side: int = 4, names: int = 8):
    """Tokens of a side x side grid, each object's name one-hot at its cell; the questions and places."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, side * side, names)
    asked, other, place = torch.zeros(n, names), torch.zeros(n, names), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        x, y = torch.randperm(names, generator=gen)[:2].tolist()
        cells = torch.randperm(side * side, generator=gen)[:2].tolist()
        (ra, ca), (rb, cb) = divmod(cells[0], side), divmod(cells[1], side)
        tokens[i, cells[0], x] = tokens[i, cells[1], y] = 1
        asked[i, x], other[i, y] = 1, 1
        place[i] = (0 if ca < cb else 1) if abs(ca - cb) >= abs(ra - rb) else (2 if ra < rb else 3)
    return tokens, (torch.arange(n), asked, other, place)


def test_the_reader_learns_place_where_the_tokens_hold_it_and_not_where_they_do_not():
    """Synthetic tokens hold each object's name at its cell and nothing of where the cell is: with the 1-D index the
    reader tells where (held-out grids), without it it cannot beat chance (25%)."""
    script = load_script("place_reader")
    fit, held = synthetic(2000, seed=0), synthetic(400, seed=1)
    with_index = script.fit_and_score(fit[0], fit[1], held[0], held[1], index=True, steps=1500)
    without = script.fit_and_score(fit[0], fit[1], held[0], held[1], index=False, steps=1500)
    assert with_index["val"] >= 75, with_index
    assert without["val"] <= 40, without


def test_the_script_reads_both_levels_of_a_llava(world_dir, mllm_dir):
    out = subprocess.run([sys.executable, str(SCRIPT), "--mllm", str(mllm_dir), "--data", str(world_dir), "--fit", "24",
                          "--steps", "3", "--threads", "1", "--json"], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)["accuracy_%"]
    assert set(table) == {f"{level}, {w} 1-D index" for level in ("projected", "tower") for w in ("with", "without")}
    assert all(0 <= acc[k] <= 100 for acc in table.values() for k in ("fit", "val"))
