"""Data sources through `datasets`: JSON, Parquet, CSV, save_to_disk directories and Dataset objects
read as JSONL is; a hub name or an unknown file is one line."""
import datasets
import pytest

from fusedrl.engine.data.records import DataError, Demonstration, Ranking, parser_for
from fusedrl.engine.data.sources import read_records
from fusedrl.engine.errors import UsageError
from fusedrl.engine.path_checks import check_input_file

ROWS = [{"prompt": "the quick", "completion": " brown fox"}, {"prompt": "hello", "completion": " world"}]
EXPECTED = [Demonstration("the quick", " brown fox"), Demonstration("hello", " world")]


def sft_rows(source, **kw):
    return read_records(source, parser_for("sft", "auto"), **kw)


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "save_to_disk", "dataset_dict", "dataset"])
def test_every_source_reads_the_same_records(tmp_path, kind):
    data = datasets.Dataset.from_list(ROWS)
    source = {"json": lambda p: data.to_json(p) and p, "parquet": lambda p: data.to_parquet(p) and p,
              "csv": lambda p: data.to_csv(p, index=False) and p,
              "save_to_disk": lambda p: data.save_to_disk(p) or p,
              "dataset_dict": lambda p: datasets.DatasetDict(train=data).save_to_disk(p) or p,
              "dataset": lambda p: data}[kind](str(tmp_path / f"d.{kind}"))
    if kind not in ("dataset",):
        check_input_file(source, "data.train_file")  # a save_to_disk directory passes the path check
    result = sft_rows(source)
    assert result.records == EXPECTED
    assert result.where[1] == ("dataset: row 2" if kind == "dataset" else f"{source}: row 2")


def test_a_bad_row_of_a_parquet_file_names_file_row_and_field(tmp_path):
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list([{"chosen": "a b", "rejected": "a c", "prompt": "p"},
                                {"chosen": "a b", "rejected": "a b", "prompt": "p"}]).to_parquet(path)
    with pytest.raises(DataError, match=r"d\.parquet: row 2: chosen and rejected are identical"):
        read_records(path, parser_for("rm", "auto"))
    with pytest.raises(DataError, match=r"d\.parquet: row 1: no column 'better' \(data.chosen_column\)"):
        read_records(path, parser_for("rm", "auto"), columns={"chosen": "better"})
    kept = read_records(path, parser_for("rm", "auto"), skip_malformed=True)
    assert kept.records == [Ranking("p", ("a b", "a c"))] and kept.skipped == 1


def test_a_hub_name_and_unknown_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^trl-lib/Capybara: no such file or directory; data sets are read from "
                                        r"local files only \(nothing is downloaded\)"):
        sft_rows("trl-lib/Capybara")
    with pytest.raises(UsageError, match=r"^data.train_file=trl-lib/Capybara: no such file or directory; .*save_to_disk"):
        check_input_file("trl-lib/Capybara", "data.train_file")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: expected a \.jsonl, \.json, \.parquet or \.csv file"):
        sft_rows(tmp_path / "d.txt")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: .*"):
        sft_rows(tmp_path / "broken.parquet")
    with pytest.raises(UsageError, match="is a directory, expected a data file or a directory written by"):
        check_input_file(tmp_path, "data.train_file")
