r"""The book's language models in PyTorch, with rnn_jax's data, for a fair comparison.

    python -m experiments.torch_reference --configs=rnn,gru,lstm,deep_gru --seeds=3

Reads the same flagfile settings (hidden size, layers, lr, epochs, batch, windows) and
the same batches (``rnn_jax.data``: the same windows, the same shuffles), trains
``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` + ``nn.Linear`` with PyTorch's default
initialisation, one-hot input, SGD and ``clip_grad_norm_``, prints each config's
final validation perplexity (mean and the per-seed values) and writes the final
training and validation perplexities of every seed to ``--output`` (JSON).
PyTorch's GRU is the reset-after form; ``bi_gru`` trains a bidirectional module.
Flagfiles whose optimiser, schedule, initialisation, embedding, dropout or forget-gate
bias this reference does not build are refused (``REQUIRED``), as are unknown names,
before any training. Needs ``pip install torch==2.13.0``.
"""

import json
import math
import statistics
import sys
from pathlib import Path

from absl import app, flags

from experiments.common import new_file_ok, parse_flags_or_exit_2

HERE = Path(__file__).resolve().parent
FLAGS = flags.FLAGS
flags.DEFINE_list("configs", ["rnn", "gru", "lstm", "deep_gru"], "Flagfiles to reproduce.")
flags.DEFINE_integer("seeds", 3, "Seeds per configuration.", lower_bound=1)
flags.DEFINE_string("output", "runs/torch_reference.json", "Results (JSON) written here.")


flags.register_validator("output", new_file_ok)  # checked before any training

# What train_one builds: the settings each flagfile must have (PyTorch's defaults are
# the book's concise models: --init=uniform, no forget-gate offset)
REQUIRED = {
    "optimizer": "sgd",
    "schedule": "constant",
    "init": "uniform",
    "embed_dim": "0",
    "dropout": "0",
    "forget_bias": "0",  # (LSTM flagfiles; PyTorch adds no forget-gate offset)
}


def config_problem(name: str) -> str | None:
    """Why flagfile ``name`` cannot be reproduced here (None if it can)."""
    path = HERE / "configs" / f"{name}.flags"
    if not path.is_file():
        names = sorted(p.stem for p in (HERE / "configs").glob("*.flags"))
        return f"no flagfile {path.name}; expected some of {names}"
    settings = read_flagfile(name)
    for key, value in REQUIRED.items():
        if settings.get(key, value) != value:
            return f"{name}.flags sets --{key}={settings[key]}; this reference trains {value}"
    return None


def read_flagfile(name: str) -> dict[str, str]:
    settings = {}
    for line in (HERE / "configs" / f"{name}.flags").read_text().splitlines():
        if line.startswith("--"):
            key, _, value = line[2:].partition("=")
            settings[key] = value
    return settings


def train_one(settings: dict[str, str], seed: int) -> dict[str, float]:
    import torch

    from rnn_jax import data, text

    torch.manual_seed(seed)
    ids, vocab = text.load_corpus()
    t, b = int(settings["num_steps"]), int(settings["batch_size"])
    windows = data.make_windows(ids, t, int(settings["num_train"]), int(settings["num_val"]))
    v, h, layers = len(vocab), int(settings["hidden_size"]), int(settings["num_layers"])
    cls = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[settings["cell"]]
    bidirectional = settings.get("bidirectional", "false") == "true"
    rnn = cls(v, h, layers, batch_first=True, bidirectional=bidirectional)
    head = torch.nn.Linear(2 * h if bidirectional else h, v)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=float(settings["lr"]))
    clip = float(settings["grad_clip"])

    def losses(batch):
        x = torch.nn.functional.one_hot(torch.from_numpy(batch.x).long(), v).float()
        logits = head(rnn(x)[0])
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, v), torch.from_numpy(batch.y).long().reshape(-1), reduction="none"
        ).reshape(batch.y.shape)
        w = torch.from_numpy(batch.weight)[:, None]
        return (ce * w).sum(), float(w.sum()) * t

    spe = data.steps_per_epoch(windows, b)
    train_sum = train_count = 0.0
    for epoch in range(int(settings["epochs"])):
        train_sum = train_count = 0.0
        for step in range(spe):
            loss_sum, count = losses(data.train_batch(windows, b, seed, epoch, step))
            opt.zero_grad()
            (loss_sum / count).backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            train_sum, train_count = train_sum + loss_sum.item(), train_count + count
    with torch.no_grad():
        val = [losses(batch) for batch in data.eval_batches(windows, b, "val")]
    val_loss = sum(float(s) for s, _ in val) / sum(c for _, c in val)
    return {"train_ppl": math.exp(train_sum / train_count), "val_ppl": math.exp(val_loss)}


def main(argv):
    del argv
    if not FLAGS.configs:
        print("error: --configs: expected at least one flagfile", file=sys.stderr)
        sys.exit(2)
    for name in FLAGS.configs:
        problem = config_problem(name)
        if problem:
            print(f"error: --configs: {problem}", file=sys.stderr)
            sys.exit(2)
    results = {}
    for name in FLAGS.configs:
        settings = read_flagfile(name)
        runs = [train_one(settings, seed) for seed in range(FLAGS.seeds)]
        results[name] = runs
        vals = [r["val_ppl"] for r in runs]
        spread = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
        each = ", ".join(f"{v:.3f}" for v in vals)
        print(f"{name}: val ppl {statistics.mean(vals):.2f}{spread} (seeds: {each})", flush=True)
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit_2)
