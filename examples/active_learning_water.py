"""Example: from 5 labelled water clusters to a model that runs stable MD of the hexamer.

1. Imports 5 small water clusters of the shipped dataset (revPBE0/def2-TZVP labels)
   into a fresh label store; other water clusters of the dataset are the fixed
   validation set.
2. Runs the active-learning loop (:class:`deltaml.active.ActiveLearner`): Langevin
   MD of the water trimer and hexamer with the current composite, the batch of
   frames that most lowers the summed posterior variance of all frames
   (``selection="variance_reduction"``) labelled with the reference, refit; and
   the same loop with random selection of the candidates, at the same budget.
3. Checks the final model with :func:`deltaml.evaluation.md_stability` on the
   hexamer at 300 K, and plots validation force error vs iteration for both.

Every label is a real reference calculation (tens of seconds for a hexamer on
two cores): ``--iterations 4 --batch 4`` costs 32 labels. Rerunning resumes
from ``--out`` (the stores and histories are kept).

    python examples/active_learning_water.py --out out/active --iterations 4 --batch 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaml import DeltaCalculator, LabelStore, import_labelled, read_labelled
from deltaml.active import ActiveLearner
from deltaml.evaluation import md_stability

DATA = Path(__file__).resolve().parents[1] / "data" / "labelled" / "water_chno.extxyz"
REFERENCE = {"method": "dft", "xc": "revpbe0", "basis": "def2-tzvp", "density_fit": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out/active"))
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--md-steps", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    water = [a for a in read_labelled(DATA) if a.info["kind"] == "water_cluster"]
    initial = [a for a in water if a.info["sampling"] == "md 100 K #0"][:5]
    validation = [a for a in water if a.info["sampling"].endswith("#1")]
    starting = [a for a in water if a.info["sampling"] == "minimum" and len(a) in (9, 18)]
    print(f"{len(initial)} initial labels, {len(validation)} validation structures, "
          f"MD from {[a.get_chemical_formula() for a in starting]}")  # fmt: skip

    histories = {}
    for selection in ("variance_reduction", "random"):
        store = LabelStore(args.out / f"{selection}.db")
        import_labelled(store, initial)
        learner = ActiveLearner(
            args.out / selection, store, starting, reference=REFERENCE, validation=validation,
            md_steps=args.md_steps, batch=args.batch, pool=5 * args.batch,
            selection=selection, seed=args.seed, workers=args.workers,
        )  # fmt: skip
        histories[selection] = learner.run(iterations=args.iterations, progress=True)
        for record in histories[selection]:
            print(f"{selection:18s} iteration {record['iteration']}: {record['n_labels']} labels, "
                  f"validation force MAE {record['validation']['force_mae']:.4f} eV/Å")  # fmt: skip

    final = ActiveLearner(
        args.out / "uncertainty", LabelStore(args.out / "uncertainty.db"), starting,
        reference=REFERENCE,
    ).model()  # fmt: skip
    hexamer = next(a for a in starting if len(a) == 18)
    report = md_stability(
        hexamer, DeltaCalculator.from_model(final), temperature_k=300.0, steps=2000,
        seed=args.seed, progress=True,
    )  # fmt: skip
    verdict = "stable" if report["stable"] else "UNSTABLE"
    print(f"hexamer, 1 ps at 300 K with the final model: {verdict}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for selection, history in histories.items():
        ax.plot([h["n_labels"] for h in history],
                [h["validation"]["force_mae"] for h in history], "o-", label=selection)  # fmt: skip
    ax.set_xlabel("reference labels")
    ax.set_ylabel("validation force MAE (eV/Å)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "error_vs_iteration.png", dpi=120)
    summary = {
        "histories": histories,
        "hexamer_stability": {k: report[k] for k in ("stable", "events")},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {args.out / 'error_vs_iteration.png'} and {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
