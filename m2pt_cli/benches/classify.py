"""Classification-style sets asked as questions: accuracy of the normalised answer against the label."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from m2pt_cli.benches.base import Bench, Sample, at_row, column, load_rows

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SNLI = ("entailment", "neutral", "contradiction")


class LabelBench(Bench):
    """A bench whose answer is one of a fixed set of labels.

    Attributes:
        image_columns, label_columns: where the image and the label are (first match wins).
        labels: names of integer labels; when None, the data's ClassLabel names are used.
        question_template: the question, with ``{choices}`` and any text column as ``{name}``.
    """

    image_columns: tuple[str, ...] = ("image", "img")
    label_columns: tuple[str, ...] = ("label",)
    labels: tuple[str, ...] | None = None
    question_template = ""

    def samples(self, data: str | None, split: str | None, keep_wording: bool) -> Iterator[Sample]:
        rows = load_rows(data or self.data, split or self.split, self.name)
        names = self.labels
        if names is None:
            feature = next((rows.features[c] for c in self.label_columns if c in rows.features), None)
            names = tuple(n.replace("_", " ") for n in getattr(feature, "names", None) or ()) or None
        for index, row in enumerate(rows):
            yield at_row(data or self.data, index, self._sample, row, index, names)

    def _sample(self, row: dict[str, Any], index: int, names: tuple[str, ...] | None) -> Sample:
        label = column(row, self.label_columns, self.name)
        answer = names[int(label)] if names is not None and not isinstance(label, str) else str(label)
        fields = {k: v for k, v in row.items() if isinstance(v, str)}
        question = self.question_template.format(choices=", ".join(names or ()), **fields)
        return Sample(
            id=str(row.get("id", index)),
            image=column(row, self.image_columns, self.name),
            question=question,
            answer=answer,
        )


class CIFAR10(LabelBench):
    name, data, split = "cifar10", "uoft-cs/cifar10", "test"
    max_new_tokens = 8
    labels = CIFAR10
    question_template = "What is the main object in this image? Answer with one of: {choices}."


class CIFAR100(LabelBench):
    name, data, split = "cifar100", "uoft-cs/cifar100", "test"
    max_new_tokens = 8
    label_columns = ("fine_label", "label")
    question_template = "What is the main object in this image? Answer with a single word."


class MNIST(LabelBench):
    name, data, split = "mnist", "ylecun/mnist", "test"
    max_new_tokens = 4
    labels = tuple(str(i) for i in range(10))
    question_template = "What digit is shown in this image?"


class VSR(LabelBench):
    """Visual Spatial Reasoning: is the caption true of the image (label 1 = yes)."""

    name, data, split = "vsr", "cambridgeltl/vsr_zeroshot", "test"
    max_new_tokens = 4
    labels = ("no", "yes")
    question_template = "Is the following statement about the image true? {caption}\nAnswer yes or no."


class SNLIVE(LabelBench):
    """SNLI-VE: does the image entail, contradict or say nothing about the hypothesis."""

    name, data, split = "snli-ve", "HuggingFaceM4/SNLI-VE", "test"
    max_new_tokens = 4
    labels = SNLI
    question_template = (
        "Does the image entail, contradict, or say nothing about this statement? {hypothesis}\n"
        "Answer with one word: entailment, neutral or contradiction."
    )
