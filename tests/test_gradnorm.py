"""GradNorm multi-task training: the weights' math, no leak of L_grad into the network, a real short run through
`gradserve train`, and the multi-task archive served by the real stack (front door + TorchServe) with every head
checked against the training code's model."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from frontdoor_fixtures import GRADSERVE, ROOT, digits, running_front_door, selected_model

from client.grpc_client import Client
from gradserve.cli import main as gradserve_main
from training.config import TASK_NAMES, MultitaskSection, TrainConfig
from training.model import ModelConfig, build_model
from training.multitask.gradnorm import MIN_WEIGHT, TaskWeights, gradnorm_loss, inverse_rates, last_shared_weight
from training.multitask.objective import forward_backward
from training.multitask.tasks import TASKS, extra_heads, task_losses, tasks_named

TINY = {"args": {"channels": [8, 16], "norm": "batch", "dropout": 0.0}}  # the built-in ConvNet, small


def batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits()
    return torch.from_numpy(images[:n]), torch.from_numpy(labels[:n])


def tiny_model(task_names: tuple[str, ...] = ("class", "ink")) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(channels=(8, 16), dropout=0.0, extra_heads=extra_heads(tasks_named(task_names))))


# ---- the weights' math ----------------------------------------------------------------------------------------


def test_inverse_rates() -> None:
    # ratios L/L(0) = [0.5, 0.25, 0.75], mean 0.5: the task that fell least (the slowest) gets the largest r
    rates = inverse_rates(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4.0, 4.0, 4.0]))
    assert torch.allclose(rates, torch.tensor([1.0, 0.5, 1.5]))
    assert torch.allclose(inverse_rates(torch.tensor([5.0, 7.0]), torch.tensor([5.0, 7.0])), torch.ones(2))


def test_g_is_the_norm_of_the_weighted_task_gradient_and_l_grad_is_the_papers() -> None:
    model, tasks = tiny_model(), tasks_named(("class", "ink"))
    x, y = batch()
    shared = last_shared_weight(model)
    assert shared is model.trunk[3].weight  # the second (last) convolution
    losses = task_losses(tasks, model.forward_all(x), x, y)
    weights = torch.tensor([1.4, 0.6], requires_grad=True)
    norms = torch.stack([torch.autograd.grad(v, shared, retain_graph=True)[0].norm() for v in losses])
    rates, alpha = torch.tensor([1.2, 0.8]), 1.5
    loss, g = gradnorm_loss(weights, norms, rates, alpha)
    for i in range(2):  # G_i = ||grad_W (w_i L_i)||, straight from autograd
        direct = torch.autograd.grad(weights[i].detach() * losses[i], shared, retain_graph=True)[0].norm()
        assert torch.allclose(g[i], direct, rtol=1e-5)
    target = g.detach().mean() * rates**alpha
    assert torch.allclose(loss, (g - target).abs().sum())
    # the target is a constant: d L_grad / d w_i = sign(G_i - target_i) * ||grad_W L_i||
    (grad,) = torch.autograd.grad(loss, weights)
    assert torch.allclose(grad, torch.sign(g - target).detach() * norms, rtol=1e-5)


def test_weights_are_renormalised_to_the_task_count_after_each_step() -> None:
    balancer = TaskWeights(3, alpha=1.5, lr=0.5, learn=True, device=torch.device("cpu"))
    norms = torch.tensor([10.0, 1.0, 0.1])  # very unequal gradient norms move the weights fast
    for i in range(50):
        losses = torch.tensor([1.0, 2.0, 3.0]) / (1 + i * torch.tensor([0.1, 0.01, 0.001]))
        balancer.backward(losses, norms)
        balancer.step()
        w = balancer.values()
        assert w.sum().item() == pytest.approx(3.0, rel=1e-6) and bool((w >= MIN_WEIGHT / 3).all())
    assert w[0] < 1 < w[2]  # the task with the largest gradient norm is weighted down
    assert balancer.initial is not None and torch.equal(balancer.initial, torch.tensor([1.0, 2.0, 3.0]))


def test_equal_method_keeps_fixed_weights() -> None:
    balancer = TaskWeights(2, alpha=1.5, lr=0.5, learn=False, device=torch.device("cpu"))
    _, g, rates = balancer.backward(torch.tensor([2.0, 900.0]), torch.tensor([0.3, 30.0]))
    balancer.step()
    assert torch.equal(balancer.values(), torch.ones(2)) and balancer.weights.grad is None
    assert torch.equal(g, torch.tensor([0.3, 30.0])) and torch.equal(rates, torch.ones(2))


def test_l_grad_does_not_leak_into_the_shared_weights() -> None:
    """After forward_backward, every network gradient is that of sum_i w_i L_i alone; the weights got L_grad's."""
    model, tasks = tiny_model(("class", "ink", "parity")), tasks_named(("class", "ink", "parity"))
    reference = copy.deepcopy(model)
    x, y = batch()
    balancer = TaskWeights(3, alpha=1.5, lr=0.025, learn=True, device=torch.device("cpu"))
    balancer.weights.data = torch.tensor([1.5, 0.2, 1.3])
    balancer.initial = torch.tensor([2.5, 50.0, 0.8])  # rates != 1, so the target differs from mean(G)
    step = forward_backward(model, tasks, balancer, last_shared_weight(model), x, y)
    assert step.grad_loss > 0 and balancer.weights.grad is not None and bool((balancer.weights.grad != 0).any())

    total = (torch.tensor([1.5, 0.2, 1.3]) * task_losses(tasks, reference.forward_all(x), x, y)).sum()
    total.backward()
    assert torch.allclose(step.loss, total.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), name


def test_config_section() -> None:
    assert set(TASK_NAMES) == set(TASKS)
    assert TrainConfig().multitask is None and TrainConfig().to_dict()["multitask"] is None
    demo = yaml.safe_load((ROOT / "gradserve-multitask.yaml").read_text())["train"]
    cfg = TrainConfig(**demo)
    assert cfg.multitask == MultitaskSection(method="gradnorm", alpha=1.5, weight_lr=0.025, tasks=("class", "ink"))
    for bad, words in (({"method": "uncertainty"}, "method"), ({"tasks": ["ink", "class"]}, "start with 'class'"),
                       ({"tasks": ["class", "size"]}, "unknown"), ({"tasks": ["class"]}, "two tasks")):
        with pytest.raises(ValueError, match=words):
            MultitaskSection(**bad)  # type: ignore[arg-type]


# ---- a real short run, packaged and served --------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gradserve train` on a tiny multi-task config: 2 epochs of GradNorm over class + ink."""
    base = tmp_path_factory.mktemp("multitask")
    config = base / "multitask.yaml"
    config.write_text(yaml.safe_dump({"train": {
        "name": "mt", "runs_dir": str(base / "runs"), "epochs": 2, "eval_every": 20, "warmup_steps": 5,
        "lr": 0.01, "threads": 1, "progress": False, "patience": None, "model": TINY,
        "multitask": {"method": "gradnorm", "alpha": 1.5, "tasks": ["class", "ink"]}}}))
    assert gradserve_main(["train", "--config", str(config)]) == 0
    return base / "runs" / "mt"


def test_a_short_run_logs_every_task_each_iteration(run: Path) -> None:
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    iters = [m for m in lines if m["kind"] == "iter"]
    assert len(iters) == 2 * 40  # 1257 training images / 32, two epochs
    for m in iters:
        assert set(m["task_losses"]) == set(m["task_grad_norms"]) == set(m["task_weights"]) == {"class", "ink"}
        assert sum(m["task_weights"].values()) == pytest.approx(2.0, rel=1e-5)
    first, last = iters[0], iters[-1]
    assert first["task_losses"]["ink"] > 30 * first["task_losses"]["class"]  # the imbalance GradNorm is for
    assert first["task_weights"] == {"class": 1.0, "ink": 1.0}
    assert last["task_weights"]["ink"] < 0.5  # GradNorm turned the large-gradient task down
    evals = [m for m in lines if m["kind"] == "eval"]
    assert len(evals) == 4 and all({"accuracy", "loss"} <= set(m["tasks"]["class"]) for m in evals)
    initial = json.loads((run / "summary.json").read_text())["multitask"]["initial_val_losses"]
    for m in evals:  # the rule sees mean_i L_i / L_i(0), on one scale; the weighted total is logged beside it
        assert m["val_loss"] == pytest.approx(sum(m["tasks"][t]["loss"] / initial[t] for t in initial) / len(initial))
        assert m["weighted_val_loss"] == pytest.approx(sum(w * m["tasks"][t]["loss"]
                                                           for t, w in m["task_weights"].items()))

    summary = json.loads((run / "summary.json").read_text())
    test = summary["multitask"]["test"]["selected"]
    assert 0 <= test["class"]["accuracy"] <= 1 and test["ink"]["mae"] > 0
    assert summary["multitask"]["method"] == "gradnorm" and summary["selected"]["test_accuracy"] >= 0
    selection = json.loads((run / "selection.json").read_text())
    assert len(selection["records"]) == 4 and selection["baseline_loss"] == pytest.approx(1.0)  # L_i(0) / L_i(0)
    assert (run / "tasks.png").stat().st_size > 0 and (run / "report.png").stat().st_size > 0


def test_reselecting_a_multitask_run_rescores_every_task(run: Path, tmp_path: Path) -> None:
    """`gradserve select` with another rule rewrites summary.json for the new choice, per-task metrics included."""
    from training import checkpoint
    from training.datasets import load_splits
    from training.multitask.tasks import evaluate_tasks
    from training.summary import load_model

    copy_of_run = tmp_path / "mt"
    shutil.copytree(run, copy_of_run)
    before = json.loads((copy_of_run / "selection.json").read_text())["selection"]["index"]
    lax = ["--loss-ratio", "1", "--tolerance", "100", "--decline-window", "1", "--strategy", "first"]
    assert gradserve_main(["select", "--run", str(copy_of_run), *lax]) == 0
    doc = json.loads((copy_of_run / "selection.json").read_text())
    chosen = doc["checkpoints"][doc["selection"]["index"]]
    assert doc["selection"]["index"] != before  # the rule change moved the choice
    summary = json.loads((copy_of_run / "summary.json").read_text())
    assert summary["selected"]["checkpoint"] == chosen and summary["multitask"]["method"] == "gradnorm"
    cfg = TrainConfig.from_dict(checkpoint.load(checkpoint.last_path(copy_of_run))["config"])
    data = load_splits(cfg)
    cpu = torch.device("cpu")
    expected = evaluate_tasks(load_model(copy_of_run / chosen, cpu), data.test, tasks_named(("class", "ink")), cpu)
    for task, metrics in expected.items():
        assert summary["multitask"]["test"]["selected"][task] == pytest.approx(metrics), task


def test_equal_method_trains_with_weights_one(tmp_path: Path) -> None:
    from training.train import train

    cfg = TrainConfig(name="eq", runs_dir=str(tmp_path), epochs=1, eval_every=20, threads=1, progress=False,
                      model=TINY, multitask={"method": "equal", "tasks": ["class", "parity"]})  # type: ignore[arg-type]
    lines = [json.loads(s) for s in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert all(m["task_weights"] == {"class": 1.0, "parity": 1.0} for m in lines)


def test_a_resumed_multitask_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    """last.pt carries the task weights, their optimizer and L_i(0): resuming from a mid-run checkpoint (what
    last.pt held at that moment) ends with the same network, task weights and metrics as running through."""
    from training import checkpoint
    from training.train import train

    cfg = TrainConfig(name="mt", runs_dir=str(tmp_path), epochs=2, eval_every=15, threads=1, progress=False,
                      model=TINY, multitask={"tasks": ["class", "ink"]})  # type: ignore[arg-type]
    run = train(cfg)
    through = checkpoint.load(checkpoint.last_path(run))
    metrics = (run / "metrics.jsonl").read_text()

    checkpoints = json.loads((run / "selection.json").read_text())["checkpoints"]
    shutil.copyfile(run / checkpoints[1], checkpoint.last_path(run))  # as if killed after the second evaluation
    resumed = checkpoint.load(checkpoint.last_path(train(cfg, resume=True)))
    for key, value in through["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert torch.equal(resumed["multitask"]["weights"], through["multitask"]["weights"])
    assert not torch.equal(through["multitask"]["weights"], torch.ones(2))  # GradNorm did move them
    assert (run / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_both_heads_served_through_the_front_door(run: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    subprocess.run([str(GRADSERVE), "package", "--run", str(run), "--model-store", str(store), "--allow-fallback"],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    images, _ = digits()
    x = images[:50]
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in selected_model(run).forward_all(torch.from_numpy(x)).items()}

    async def ask(target: str, token: str) -> tuple[list[str], dict[str, np.ndarray]]:
        async with Client(target, token=token) as client:
            metadata = await client.metadata("mt")
            return [o.name for o in metadata.outputs], await client.infer("mt", x)

    with running_front_door(store, tmp_path / "door") as door:
        names, outputs = asyncio.run(ask(door.grpc_target, door.token or ""))
    assert names == ["logits", "label", "probabilities", "class_name", "ink"]
    assert set(outputs) == set(names) and outputs["ink"].shape == (50, 1)
    for head in ("logits", "ink"):
        assert np.abs(outputs[head] - expected[head]).max() <= 1e-5, head
    assert np.array_equal(outputs["label"], expected["logits"].argmax(axis=1))
    with zipfile.ZipFile(store / "mt.mar") as archive:
        manifest = json.loads(archive.read("gradserve.json"))
    assert [t["name"] for t in manifest["tasks"]] == ["class", "ink"] and manifest["tasks"][1]["loss"] == "mse"
