"""Benchmarks, one small module each, reached by name through ``BENCHES``."""

from __future__ import annotations

from m2pt_cli.registry import Registry

BENCHES = Registry("bench")
for _name, _target in {
    "mme": "m2pt_cli.benches.mme:MME",
    "pope": "m2pt_cli.benches.pope:POPE",
    "textvqa": "m2pt_cli.benches.textvqa:TextVQA",
    "vsr": "m2pt_cli.benches.classify:VSR",
    "snli-ve": "m2pt_cli.benches.classify:SNLIVE",
    "cifar10": "m2pt_cli.benches.classify:CIFAR10",
    "cifar100": "m2pt_cli.benches.classify:CIFAR100",
    "mnist": "m2pt_cli.benches.classify:MNIST",
    "demo": "m2pt_cli.benches.demo:Demo",
    "qa": "m2pt_cli.benches.qa:QA",
}.items():
    BENCHES.register(_name, _target)
