"""The experiment grids follow the paper's protocols and write their tables."""

import csv

import prostate_backbone_grid
import prostate_transfer_grid as grid


def test_table3_chains_per_target():
    assert grid.chains_for("A") == [(), ("B",), ("C",), ("B", "C"), ("C", "B"), (grid.ALL,)]
    assert [grid.chain_name(c) for c in grid.chains_for("C")] == [
        "ImageNet", "Site A", "Site B", "Site A → Site B", "Site B → Site A", "All_Data"]
    # a row is called ImageNet only when ImageNet weights are loaded
    assert grid.init_name(False) == "scratch" and grid.init_name(False, {"pretrained_path": "enc.pt"}) == "ImageNet"
    assert grid.init_name(True) == "ImageNet" and grid.chain_name((), grid.init_name(False)) == "scratch"
    # every chain of the table has the paper's number to compare with
    assert all((c, t) in grid.PAPER for t in "ABC" for c in grid.chains_for(t))


def test_table3_writer(tmp_path):
    rows = [{"source": grid.chain_name(c), "target": "Site A", "fold": 0, "val_dice": 90.0, "test_dice": 80.0 + i,
             "test_iou": 70.0, "paper_dice": grid.PAPER[(c, "A")][0], "paper_iou": grid.PAPER[(c, "A")][1]}
            for i, c in enumerate(grid.chains_for("A"))]
    grid.write_tables(rows, tmp_path, epochs=3, folds=[0], init="scratch")
    assert [r["source"] for r in csv.DictReader(open(tmp_path / "table3.csv"))] == [r["source"] for r in rows]
    md = (tmp_path / "table3.md").read_text()
    assert "starts from a randomly initialised encoder (scratch" in md
    assert "| Site B → Site C | Site A | 0 | 83.00 | 70.00 | 91.65 | 85.53 |" in md
    assert (tmp_path / "table3_heatmap.png").stat().st_size > 1000


def test_table2_has_the_papers_grid():
    assert set(prostate_backbone_grid.PAPER) == set(prostate_backbone_grid.ENCODERS)
    assert prostate_backbone_grid.PAPER["efficientnet-b3"]["UnetPlusPlus"] == (89.27, 1.62)
