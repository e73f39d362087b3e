"""Data sources through `datasets`: JSON, Parquet, CSV, save_to_disk directories and Dataset objects
read as JSONL is; a hub name or an unknown file is one line."""
import datasets
import pytest

from fusedrl.engine.data.records import DataError, Demonstration, Ranking, parser_for
from fusedrl.engine.data.sources import read_records
from fusedrl.engine.errors import UsageError
from fusedrl.engine.runs.path_checks import check_input_file

ROWS = [{"prompt": "the quick", "completion": " brown fox"},
        {"prompt": "hello", "completion": " world"}]
EXPECTED = [Demonstration("the quick", " brown fox"), Demonstration("hello", " world")]


def sft_rows(source, **kw):
    return read_records(source, parser_for("sft", "auto"), **kw)


def write(data, kind: str, path: str):
    """`data` written as `kind` at `path`; returns what a config names (or the Dataset itself)."""
    {"json": data.to_json, "parquet": data.to_parquet, "csv": lambda p: data.to_csv(p, index=False),
     "save_to_disk": data.save_to_disk, "dataset": lambda p: None,
     "dataset_dict": datasets.DatasetDict(train=data).save_to_disk}[kind](path)
    return data if kind == "dataset" else path


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "save_to_disk", "dataset_dict",
                                  "dataset"])
def test_every_source_reads_the_same_records(tmp_path, kind):
    source = write(datasets.Dataset.from_list(ROWS), kind, str(tmp_path / f"d.{kind}"))
    if kind != "dataset":
        check_input_file(source, "data.train_file")  # save_to_disk directories pass the path check
    result = sft_rows(source)
    assert result.records == EXPECTED
    assert result.where[1] == ("dataset: row 2" if kind == "dataset" else f"{source}: row 2")


def test_a_bad_row_of_a_parquet_file_names_file_row_and_field(tmp_path):
    path = str(tmp_path / "d.parquet")
    rows = [{"chosen": "a b", "rejected": "a c", "prompt": "p"},
            {"chosen": "a b", "rejected": "a b", "prompt": "p"}]
    datasets.Dataset.from_list(rows).to_parquet(path)
    with pytest.raises(DataError, match=r"d\.parquet: row 2: chosen and rejected are identical"):
        read_records(path, parser_for("rm", "auto"))
    with pytest.raises(DataError, match=r"d\.parquet: row 1: no column 'better' \(data.chosen_"):
        read_records(path, parser_for("rm", "auto"), columns={"chosen": "better"})
    kept = read_records(path, parser_for("rm", "auto"), skip_malformed=True)
    assert kept.records == [Ranking("p", ("a b", "a c"))] and kept.skipped == 1


def test_a_hub_name_and_unknown_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^trl-lib/Capybara: no such file or directory; data "
                                        r"sets are read from local files only \(nothing is "
                                        r"downloaded\)"):
        sft_rows("trl-lib/Capybara")
    with pytest.raises(UsageError, match=r"^data.train_file=trl-lib/Capybara: no such file or "
                                         r"directory; .*save_to_disk"):
        check_input_file("trl-lib/Capybara", "data.train_file")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"d\.txt: expected a \.jsonl, \.json, \.parquet or \.csv"):
        sft_rows(tmp_path / "d.txt")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: .*"):
        sft_rows(tmp_path / "broken.parquet")
    with pytest.raises(UsageError, match="is a directory, expected a data file or a directory"):
        check_input_file(tmp_path, "data.train_file")


def test_a_malformed_file_is_refused_with_the_parser_s_own_words(tmp_path):
    """datasets wraps a reader's failure in DatasetGenerationError ("An error occurred while
    generating the dataset"): the one line says what the parser met instead."""
    (tmp_path / "bad.csv").write_text('prompt,completion\n"the quick, brown fox\n')
    with pytest.raises(DataError) as error:
        sft_rows(tmp_path / "bad.csv")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.csv'}: datasets could not read it: ParserError: "
                              "Error tokenizing data")
    assert "EOF inside string" in message and "\n" not in message, message
    (tmp_path / "bad.json").write_text("not json at all\n")
    with pytest.raises(DataError) as error:
        sft_rows(tmp_path / "bad.json")
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'bad.json'}: datasets could not read it: ")
    assert "JSON parse error" in message and "DatasetGenerationError" not in message, message
    assert "\n" not in message
