"""Classification-style benches read local files with the hub datasets' columns."""

from __future__ import annotations

import io

import datasets
from PIL import Image

from m2pt_cli.benches.classify import CIFAR10, CIFAR100, MNIST, SNLIVE, VSR


def png() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def parquet(tmp_path, name, columns: dict, features: dict) -> str:
    path = tmp_path / f"{name}.parquet"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


def test_cifar10_names_integer_labels_and_scores_normalised_answers(tmp_path):
    data = parquet(
        tmp_path,
        "c10",
        {"img": [png(), png()], "label": [0, 9]},
        {"img": datasets.Image(), "label": datasets.Value("int64")},
    )
    bench = CIFAR10()
    samples = list(bench.samples(data, None, False))
    assert [s.answer for s in samples] == ["airplane", "truck"]
    assert "airplane, automobile, bird" in samples[0].question
    assert bench.correct(bench.parse("An Airplane."), samples[0].answer) == 1.0
    assert bench.correct(bench.parse("a ship"), samples[1].answer) == 0.0


def test_cifar100_takes_class_names_from_the_data(tmp_path):
    names = ["apple", "aquarium_fish", "baby"]
    data = parquet(
        tmp_path,
        "c100",
        {"img": [png()], "fine_label": [1]},
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names)},
    )
    (sample,) = CIFAR100().samples(data, None, False)
    assert sample.answer == "aquarium fish"


def test_mnist_vsr_and_snli_questions(tmp_path):
    mnist = parquet(
        tmp_path,
        "mnist",
        {"image": [png()], "label": [7]},
        {"image": datasets.Image(), "label": datasets.Value("int64")},
    )
    (digit,) = MNIST().samples(mnist, None, False)
    assert digit.answer == "7" and digit.question == "What digit is shown in this image?"
    vsr = parquet(
        tmp_path,
        "vsr",
        {"image": [png()], "caption": ["The cat is on the mat."], "label": [1]},
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("int64")},
    )
    (claim,) = VSR().samples(vsr, None, False)
    assert claim.answer == "yes" and "The cat is on the mat." in claim.question
    snli = parquet(
        tmp_path,
        "snli",
        {"image": [png()], "hypothesis": ["Two dogs run."], "label": [2]},
        {"image": datasets.Image(), "hypothesis": datasets.Value("string"), "label": datasets.Value("int64")},
    )
    (pair,) = SNLIVE().samples(snli, None, False)
    assert pair.answer == "contradiction" and "Two dogs run." in pair.question
