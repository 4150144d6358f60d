"""The accuracy protocol (`benchmarks.accuracy`) on a tiny setting: every evaluation pair gets a
Git Re-Basin weight-matching row ("weights") at every stop point beside the paper's other methods,
and `--methods weights --update` recomputes exactly those rows into existing result files while
every other line of the CSV and of the markdown stays as it was."""
import csv

import pytest
import torch

pytest.importorskip("sklearn")

from benchmarks.accuracy.protocol import PAPER_METHODS, run_setting  # noqa: E402
from benchmarks.accuracy.report import markdown, write_csv  # noqa: E402
from benchmarks.accuracy.update import UpdateError, update_setting  # noqa: E402
from benchmarks.common.data import load_digits  # noqa: E402
from benchmarks.common.models import DigitsVGG  # noqa: E402
from benchmarks.common.settings import Setting, Stop  # noqa: E402

TINY = Setting("t", "digits 5+5, tiny VGG-style CNN", load_digits,
               lambda: DigitsVGG(width=8, hidden=16), [Stop("stage1", "stage1"), Stop("full", None)],
               epochs=3)


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One held-out and two evaluation pairs, a one-point grid, no auto rows; files as the CLI
    writes them."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("accuracy")
    result = run_setting(TINY, pairs=3, epochs=TINY.epochs, grid=((0.5,), (1.0,)),
                         log=lambda line: None, auto=False)
    write_csv(result, out / "accuracy_t.csv")
    (out / "accuracy_t.md").write_text(markdown(result))
    return result, out


def test_protocol_has_a_weights_row_per_pair_and_stop(full_run):
    result, _ = full_run
    merges = [r for r in result.rows if r.stop != "-"]
    assert [r.method for r in merges if r.pair == 1 and r.stop == "stage1"] == \
        ["default", *PAPER_METHODS]
    weights = {(r.pair, r.stop): r for r in merges if r.method == "weights"}
    average = {(r.pair, r.stop): r for r in merges if r.method == "average"}
    assert sorted(weights) == [(1, "full"), (1, "stage1"), (2, "full"), (2, "stage1")]
    ensemble = {r.pair: r.acc.joint for r in result.rows if r.method == "ensemble"}
    for key, row in weights.items():
        # one model's width, as averaging: the same parameters and FLOPs
        assert (row.params, row.flops, row.zipped) == \
            (average[key].params, average[key].flops, average[key].zipped)
        assert 0.1 < row.acc.joint <= ensemble[key[0]] + 0.05
        assert 0.0 <= row.acc.task_a <= 1.0 and 0.0 <= row.acc.task_b <= 1.0
    # weight matching aligns the models before averaging: at the first stop it beats plain
    # averaging on the mean over the pairs
    gain = [weights[(p, "stage1")].acc.joint - average[(p, "stage1")].acc.joint for p in (1, 2)]
    assert sum(gain) / 2 > 0.05, gain
    assert "weights = Git Re-Basin weight matching" in (full_run[1] / "accuracy_t.md").read_text()


def test_update_recomputes_only_the_named_rows(full_run, tmp_path):
    _, out = full_run
    csv_full, md_full = read(out / "accuracy_t.csv"), (out / "accuracy_t.md").read_text()
    # the files as they were before "weights" was compared: its CSV rows and table lines gone
    (tmp_path / "accuracy_t.csv").write_text("".join(
        line for line in (out / "accuracy_t.csv").read_text().splitlines(keepends=True)
        if ",weights," not in line))
    (tmp_path / "accuracy_t.md").write_text("\n".join(
        line for line in md_full.split("\n") if not line.startswith("| weights |")))
    before = (tmp_path / "accuracy_t.md").read_text().split("\n")

    update = update_setting(TINY, tmp_path, ["weights"], width=1, log=lambda line: None)
    assert update.checked == 2 * 3  # model A, model B, ensemble of both pairs reproduced
    assert len(update.rows) == 2 * 2 and not update.replaced

    # the CSV: the full run's, line for line (retraining from the seeds is deterministic)
    assert read(tmp_path / "accuracy_t.csv") == csv_full
    # the markdown: the full run's table; every line that was there before is still there, in order
    after = (tmp_path / "accuracy_t.md").read_text().split("\n")
    table = [line for line in after if line.startswith("|")]
    assert table == [line for line in md_full.split("\n") if line.startswith("|")]
    kept = iter(after)
    assert all(any(line == other for other in kept) for line in before)
    added = [line for line in after if line not in before]
    assert len(added) == 2 * 1 + 1  # two weights lines, the update's run-time line
    assert added[-1].startswith("Rows added later (weights): `python -m benchmarks.accuracy")
    assert (tmp_path / "accuracy_t.png").stat().st_size > 10_000

    # recomputing an existing method replaces its rows with the same numbers
    again = update_setting(TINY, tmp_path, ["average"], width=1, log=lambda line: None)
    assert again.replaced and all(line.endswith(": same") for line in again.replaced)
    assert read(tmp_path / "accuracy_t.csv") == csv_full


def test_update_refuses_files_of_other_models(full_run, tmp_path):
    _, out = full_run
    text = (out / "accuracy_t.csv").read_text()
    model_a = next(line for line in text.splitlines() if ",1,model A," in line)
    joint = model_a.split(",")[7]
    (tmp_path / "accuracy_t.csv").write_text(
        text.replace(model_a, model_a.replace(f",{joint},", f",{float(joint) - 0.01:.4f},", 1)))
    (tmp_path / "accuracy_t.md").write_text((out / "accuracy_t.md").read_text())
    with pytest.raises(UpdateError, match="pair 1 was not reproduced: model A: joint"):
        update_setting(TINY, tmp_path, ["weights"], width=1, log=lambda line: None)
    with pytest.raises(UpdateError, match="choose from"):
        update_setting(TINY, tmp_path, ["auto"], width=1, log=lambda line: None)


def test_update_keeps_an_older_files_columns(full_run, tmp_path):
    """Files written before the "corrections" column keep their 13 columns."""
    _, out = full_run
    full = read(out / "accuracy_t.csv")
    columns = [c for c in full[0] if c != "corrections"]
    older = [{c: row[c] for c in columns} for row in full]
    with open(tmp_path / "accuracy_t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(row for row in older if row["method"] != "weights")
    (tmp_path / "accuracy_t.md").write_text((out / "accuracy_t.md").read_text())
    update_setting(TINY, tmp_path, ["weights"], width=1, log=lambda line: None)
    assert read(tmp_path / "accuracy_t.csv") == older
