"""Active learning: grow the training set where the composite is uncertain.

One iteration, in four stages, each of which writes its result before the next
starts (so that an interrupted loop resumes at the stage it stopped in, and
nothing labelled is lost or labelled twice):

1. ``explore``: Langevin MD with the current composite from every starting
   geometry (or, with ``explore_starts``, the next few in rotation) at every
   temperature; frames are recorded with their largest predicted force
   uncertainty (``iteration_<k>/candidates.extxyz``), beside the unlabelled
   candidates of the last ``carry`` iterations, scored again.
2. ``select``: a batch of candidates (:func:`select_batch`): the greedy batch
   that most lowers the summed posterior variance of all candidates' atomic
   environments (``variance_reduction``), or the ``pool`` most uncertain
   candidates spread by farthest-point sampling of their mean SOAP vectors
   (``uncertainty``), or, for a control experiment, a seeded random batch.
3. ``label``: the batch is labelled with the reference into the label store
   (:func:`deltaml.labelling.label_structures`, itself resumable).
4. ``fit``: the model is refitted on every label of the store and saved
   (``iteration_<k>/model.npz``); errors on a fixed validation set, uncertainty
   statistics and the wall time of each stage are recorded in ``history.json``.

Iteration 0 only fits the initial store (e.g. 5 labelled structures). The loop
stops on a reference budget (labels in the store), a target uncertainty (the
median of the candidates' largest force uncertainty) or a number of iterations.

:func:`on_the_fly` is the other mode: one MD run that stops when the force
uncertainty crosses a threshold, labels that frame, refits, and continues.

Data flow: store, labelling, model, composite, simulation → **active**.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
from ase import Atoms, units
from ase.io import read, write
from numpy.typing import NDArray

from deltaml.calculator import DeltaCalculator
from deltaml.crystals import identify_molecules, strained_cell
from deltaml.dataset import delta_targets
from deltaml.errors import MissingLabelError, ParameterError
from deltaml.evaluation import errors, predict_all
from deltaml.files import atomic_path, write_text_atomic
from deltaml.labelling import label_structures, reference_calculator
from deltaml.model import SparseGPR, kernel_values
from deltaml.sampling import farthest_points
from deltaml.simulation import relax, run_md
from deltaml.store import LabelStore

logger = logging.getLogger(__name__)

__all__ = [
    "CRYSTAL_RESOLUTION",
    "SCORES",
    "SELECTIONS",
    "STAGES",
    "ActiveLearner",
    "crystal_score",
    "crystal_uncertainty",
    "on_the_fly",
    "select_batch",
    "variance_reduction_batch",
]

STAGES = ("explore", "select", "label", "fit")
#: How a candidate's uncertainty is scored: the largest force σ (eV/Å), or, for
#: crystals, the per-molecule energy σ and the largest stress σ in units of
#: :data:`CRYSTAL_RESOLUTION` (dimensionless).
SCORES = ("forces", "crystal")
#: What a crystal label should resolve (the accuracy a polymorph ranking needs):
#: 1 kJ/mol per molecule (eV) and 0.1 GPa of stress (eV/Å³).
CRYSTAL_RESOLUTION = {"energy_per_molecule": units.kJ / units.mol, "stress": 0.1 * units.GPa}


class ActiveLearner:
    """Uncertainty-driven growth of a labelled set, resumable from its folder.

    Parameters
    ----------
    workdir : path
        Folder of the run: ``history.json`` and one folder per iteration.
    store : LabelStore
        Labels (the initial ones, and those this loop adds).
    starting : sequence of ase.Atoms
        Starting geometries of the exploratory MD.
    reference : dict, optional
        :class:`~deltaml.reference.PySCFReference` keywords (default revPBE0/def2-TZVP),
        or, with ``"code": "cp2k"``, :class:`~deltaml.reference_cp2k.CP2KReference`
        keywords: periodic labels with stress, for crystals.
    model : dict, optional
        :class:`~deltaml.model.SparseGPR` keywords.
    validation : sequence of ase.Atoms, optional
        Reference-labelled structures (energy, forces) never trained on; their
        errors are recorded after every fit.
    temperatures : sequence of float, default=(300.0,)
        MD temperatures, K.
    md_steps, md_interval : int
        MD steps per run and steps between candidate frames.
    timestep_fs : float, default=0.5
        MD time step, fs.
    batch : int, default=5
        Structures labelled per iteration.
    pool : int, default=20
        The most uncertain candidates among which the batch is spread (FPS;
        ``selection="uncertainty"`` only).
    selection : {"variance_reduction", "uncertainty", "random"}, default="variance_reduction"
        How a batch is chosen (:func:`select_batch`); ``random``: a seeded random
        batch of all candidates (control experiment). ``variance_reduction`` is
        the default: on the shipped dataset it beat ``uncertainty`` at every
        budget and random selection at 25 and 100 labels
        (``benchmarks/bench_active_learning.py``).
    seed : int, default=0
        Seed of the MD, the selection and the model.
    workers : int, default=1
        Labelling processes.
    strained : int, default=0
        Crystals: homogeneously strained copies of each periodic start added to the
        candidates of every iteration (with the MD frames), within ``max_strain``
        (default ±5 % per strain component).
    relax_steps : int, default=0
        Crystals: each periodic start is also relaxed (positions and cell) with the
        current composite for this many steps, and five frames spread over the
        path join the candidates: the cells a relax-and-rank run visits.
    explore_starts : int, optional
        Starting geometries explored per iteration, in rotation (iteration k takes
        the next ``explore_starts`` after those of iteration k − 1); default all.
        With many crystals, exploring every one every iteration costs hours of
        composite MD per batch of labels.
    carry : int, default=0
        Iterations an unselected candidate stays in the pool: the candidates of the
        last ``carry`` iterations that were not labelled join each new pool, scored
        again by the new model (no baseline call). With ``explore_starts`` it keeps
        every system in the selection while only a few are explored at a time.
    score : {"forces", "crystal"}, default="forces"
        The uncertainty of a candidate: its largest force σ (eV/Å), or, for
        crystals, the larger of its per-molecule energy σ and largest stress σ in
        units of :data:`CRYSTAL_RESOLUTION` (:func:`crystal_uncertainty`), i.e. what a
        polymorph ranking needs. Used by ``selection="uncertainty"`` (then spread
        by diversity) and ``target_uncertainty``.
    """

    def __init__(
        self,
        workdir: str | Path,
        store: LabelStore,
        starting: Sequence[Atoms],
        *,
        reference: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        validation: Sequence[Atoms] | None = None,
        temperatures: Sequence[float] = (300.0,),
        md_steps: int = 400,
        md_interval: int = 20,
        timestep_fs: float = 0.5,
        batch: int = 5,
        pool: int = 20,
        selection: str = "variance_reduction",
        seed: int = 0,
        workers: int = 1,
        strained: int = 0,
        max_strain: float = 0.05,
        relax_steps: int = 0,
        explore_starts: int | None = None,
        carry: int = 0,
        score: str = "forces",
    ) -> None:
        if selection not in SELECTIONS:
            raise ParameterError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if batch < 1 or pool < batch:
            raise ParameterError(f"need 1 <= batch <= pool, got batch {batch}, pool {pool}")
        if not starting:
            raise ParameterError("give at least one starting geometry")
        self.workdir = Path(workdir)
        self.store = store
        self.starting = [a.copy() for a in starting]
        if strained < 0 or not 0 <= max_strain < 0.5:
            raise ParameterError(
                f"need strained >= 0 and 0 <= max_strain < 0.5, got {strained}, {max_strain}"
            )
        self.reference = dict(reference or {})
        # PySCF's (molecules) or, with "code": "cp2k", CP2K's (cells too, with stress).
        self.record = reference_calculator(dict(self.reference)).record()
        self.strained, self.max_strain = int(strained), float(max_strain)
        if relax_steps < 0:
            raise ParameterError(f"relax_steps must be >= 0, got {relax_steps}")
        if score not in SCORES:
            raise ParameterError(f"score must be one of {SCORES}, got {score!r}")
        self.relax_steps, self.score = int(relax_steps), score
        if explore_starts is not None and explore_starts < 1:
            raise ParameterError(f"explore_starts must be >= 1, got {explore_starts}")
        if carry < 0:
            raise ParameterError(f"carry must be >= 0, got {carry}")
        self.explore_starts = len(starting) if explore_starts is None else int(explore_starts)
        self.carry = int(carry)
        self.model_params = {"seed": seed, **(model or {})}
        self.validation = list(validation or [])
        self.temperatures = tuple(float(t) for t in temperatures)
        self.md_steps, self.md_interval, self.timestep_fs = md_steps, md_interval, timestep_fs
        self.batch, self.pool, self.selection = batch, pool, selection
        self.seed, self.workers = seed, workers
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.history: list[dict[str, Any]] = self._read_history()

    # -- bookkeeping ----------------------------------------------------------------

    @property
    def history_path(self) -> Path:
        return self.workdir / "history.json"

    def _read_history(self) -> list[dict[str, Any]]:
        if not self.history_path.exists():
            return []
        return json.loads(self.history_path.read_text())["iterations"]

    def _write_history(self) -> None:
        # Atomic: a kill never leaves half a history.
        write_text_atomic(
            self.history_path, json.dumps({"iterations": self.history}, indent=1, sort_keys=True)
        )

    def selected_structures(self) -> list[Atoms]:
        """Every candidate the loop has selected for labelling, in order, with its ``info``.

        ``info`` keeps ``source`` (iteration, start, and MD temperature, strain or
        relaxation step), ``system`` (the start's, if it had one) and
        ``uncertainty``: the provenance of each label the loop added.
        """
        out = []
        for record in self.history:
            path = self.workdir / f"iteration_{record['iteration']}" / "candidates.extxyz"
            if record.get("selected") and path.exists():
                candidates = read(path, index=":")
                out += [candidates[i] for i in record["selected"]]
        return out

    def _folder(self, iteration: int) -> Path:
        folder = self.workdir / f"iteration_{iteration}"
        folder.mkdir(exist_ok=True)
        return folder

    def _labelled(self) -> list[Atoms]:
        return _labels_of(self.store, self.record)

    def model(self, iteration: int | None = None) -> SparseGPR:
        """The model saved at the end of an iteration (default: the last one)."""
        done = [h["iteration"] for h in self.history if "fit" in h["stages"]]
        if not done:
            raise MissingLabelError("no model fitted yet: run the loop first")
        k = done[-1] if iteration is None else iteration
        return SparseGPR.load(self._folder(k) / "model.npz")

    # -- the loop -------------------------------------------------------------------

    def run(
        self,
        *,
        iterations: int = 5,
        budget: int | None = None,
        target_uncertainty: float | None = None,
        stop_after: tuple[int, str] | None = None,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Run (or resume) the loop until a stopping criterion holds.

        Parameters
        ----------
        iterations : int, default=5
            Iterations after the initial fit (iteration 0).
        budget : int, optional
            Stop when the store holds this many labels.
        target_uncertainty : float, optional
            Stop when the median largest force uncertainty of the candidates of an
            iteration is below this, eV/Å.
        stop_after : (int, str), optional
            Return right after this (iteration, stage), as an interruption would
            (for tests of resumption).
        progress : bool, default=False
            Progress bars.

        Returns
        -------
        list of dict
            The history: one record per iteration.
        """
        k = 0
        while True:
            record = self._iteration_record(k)
            for stage in STAGES:
                if k == 0 and stage != "fit":
                    continue
                if stage not in record["stages"]:
                    start = time.perf_counter()
                    record.update(getattr(self, f"_{stage}")(k, record, progress))
                    record["stages"][stage] = time.perf_counter() - start
                    self._write_history()
                if stop_after == (k, stage):
                    return self.history
            if self._should_stop(k, record, iterations, budget, target_uncertainty):
                record["stopped"] = True
                self._write_history()
                return self.history
            k += 1

    def _iteration_record(self, k: int) -> dict[str, Any]:
        for record in self.history:
            if record["iteration"] == k:
                return record
        record = {"iteration": k, "stages": {}}
        self.history.append(record)
        return record

    def _should_stop(
        self,
        k: int,
        record: dict[str, Any],
        iterations: int,
        budget: int | None,
        target: float | None,
    ) -> bool:
        if record.get("stopped"):
            return True
        if k >= iterations:
            return True
        if budget is not None and record["n_labels"] >= budget:
            return True
        median = record.get("candidate_uncertainty_median")
        return target is not None and median is not None and median < target

    # -- stages ---------------------------------------------------------------------

    def _explore(self, k: int, record: dict[str, Any], progress: bool) -> dict[str, Any]:
        model = self.model(k - 1)
        calc = DeltaCalculator.from_model(model, force_uncertainty=self.score == "forces")
        candidates: list[Atoms] = []
        explored = self._explored_starts(k)
        for s in explored:
            start = self.starting[s]
            for t, temperature in enumerate(self.temperatures):
                atoms = start.copy()
                atoms.calc = calc

                def keep(
                    step: int,
                    current: Atoms,
                    s: int = s,
                    start: Atoms = start,
                    temperature: float = temperature,
                ) -> None:
                    frame = Atoms(current.numbers, current.positions, cell=current.cell,
                                  pbc=current.pbc)  # fmt: skip
                    if self.score == "forces":
                        frame.info["uncertainty"] = float(
                            np.max(current.calc.results["forces_uncertainty"])
                        )
                    _provenance(frame, start, f"iteration {k}, start {s}, {temperature:g} K")
                    candidates.append(frame)

                try:
                    run_md(
                        atoms, temperature_k=temperature, steps=self.md_steps,
                        timestep_fs=self.timestep_fs, interval=self.md_interval,
                        seed=self.seed + 1000 * k + 10 * s + t, observer=keep, progress=progress,
                    )  # fmt: skip
                except Exception:  # an unstable run: its frames so far are candidates
                    pass
        candidates += self._strained_cells(k, explored)
        candidates += self._relaxation_frames(k, calc, explored, progress)
        for frame in candidates:
            frame.info["explored"] = k
        fresh = len(candidates)
        candidates += self._carried(k)
        for i, frame in enumerate(candidates):
            # MD frames carry the force σ of their step; the rest is scored by the
            # model (the composite's σ is the correction's: no baseline call needed).
            if self.score == "crystal" or i >= fresh or "uncertainty" not in frame.info:
                frame.info["uncertainty"] = _model_score(model, frame, self.score)
        path = self._folder(k) / "candidates.extxyz"
        with atomic_path(path) as partial:
            write(partial, candidates, format="extxyz")
        sigma = [a.info["uncertainty"] for a in candidates]
        return {
            "explored_starts": explored,
            "n_carried": len(candidates) - fresh,
            "n_candidates": len(candidates),
            "candidate_uncertainty_median": float(np.median(sigma)) if sigma else None,
            "candidate_uncertainty_max": float(np.max(sigma)) if sigma else None,
        }

    def _explored_starts(self, k: int) -> list[int]:
        """Indices of the starts explored in iteration ``k`` (>= 1): the next
        ``explore_starts`` in rotation."""
        n = len(self.starting)
        first = (k - 1) * self.explore_starts
        return sorted({(first + i) % n for i in range(min(self.explore_starts, n))})

    def _carried(self, k: int) -> list[Atoms]:
        """The unselected candidates of iteration ``k − 1`` explored at most ``carry``
        iterations before ``k`` (iteration k − 1's pool holds those it carried)."""
        path = self.workdir / f"iteration_{k - 1}" / "candidates.extxyz"
        if not self.carry or k < 2 or not path.exists():
            return []
        selected = set(self._iteration_record(k - 1).get("selected", []))
        out = []
        for i, frame in enumerate(read(path, index=":")):
            if i not in selected and frame.info.get("explored", k - 1) >= k - self.carry:
                out.append(frame)
        return out

    def _strained_cells(self, k: int, explored: Sequence[int]) -> list[Atoms]:
        """``strained`` copies of each periodic start, homogeneously strained (seeded).

        Each copy's cell is ``cell @ (I + ε)`` with a symmetric ε whose components
        are uniform in ±``max_strain`` (atoms follow the cell), so that a crystal's
        candidates include the compressed and sheared cells a cell relaxation or a
        pressure scan visits, not only thermal motion at one volume.
        """
        out: list[Atoms] = []
        rng = np.random.default_rng([self.seed, k, 7])
        for s in explored:
            start = self.starting[s]
            if not start.pbc.all():
                continue
            bare = Atoms(start.numbers, start.positions, cell=start.cell, pbc=True)
            for j in range(self.strained):
                atoms = strained_cell(bare, self.max_strain, rng)
                out.append(_cell_candidate(atoms, start, f"iteration {k}, start {s}, strain {j}"))
        return out

    def _relaxation_frames(
        self, k: int, calc: DeltaCalculator, explored: Sequence[int], progress: bool
    ) -> list[Atoms]:
        """Five frames spread over a ``relax_steps`` cell relaxation of each explored
        periodic start."""
        if not self.relax_steps:
            return []
        out: list[Atoms] = []
        for s in explored:
            start = self.starting[s]
            if not start.pbc.all():
                continue
            atoms = Atoms(start.numbers, start.positions, cell=start.cell, pbc=True)
            atoms.info.update(start.info)
            atoms.calc = calc
            path = self._folder(k) / f"relax_{s}.extxyz"
            try:
                relax(atoms, fmax=0.01, steps=self.relax_steps, cell=True, trajectory=path,
                      progress=progress)  # fmt: skip
            except Exception:  # an unstable relaxation: its frames so far are candidates
                pass
            if not path.exists():
                continue
            path_frames = read(path, index=":")[1:]  # not the start itself
            picks = np.unique(np.linspace(0, len(path_frames) - 1, 5).round().astype(int))
            for j in picks if path_frames else []:
                source = f"iteration {k}, start {s}, relaxation step {j + 1}"
                out.append(_cell_candidate(path_frames[j], start, source))
        return out

    def _select(self, k: int, record: dict[str, Any], progress: bool) -> dict[str, Any]:
        candidates = read(self._folder(k) / "candidates.extxyz", index=":")
        if not candidates:
            return {"selected": []}
        sigma = np.array([a.info["uncertainty"] for a in candidates])
        labelled = self._labelled() if self.selection == "variance_reduction" else None
        chosen = select_batch(
            self.model(k - 1), candidates, sigma, batch=self.batch, pool=self.pool,
            selection=self.selection, seed=self.seed + k, labelled=labelled,
        )  # fmt: skip
        return {"selected": chosen}

    def _label(self, k: int, record: dict[str, Any], progress: bool) -> dict[str, Any]:
        candidates = read(self._folder(k) / "candidates.extxyz", index=":")
        chosen = [candidates[i] for i in record["selected"]]
        for atoms in chosen:
            atoms.info = {}
        report = label_structures(
            chosen, self.store, reference=self.reference, workers=self.workers,
            progress=progress,
        )  # fmt: skip
        return {"labelled": report.computed, "label_failures": report.failed}

    def _fit(self, k: int, record: dict[str, Any], progress: bool) -> dict[str, Any]:
        labelled = self._labelled()
        logger.info("iteration %d: fitting on %d labels", k, len(labelled))
        targets, terms = delta_targets(labelled)
        model = SparseGPR(**self.model_params).fit(targets, trained_with=terms, progress=progress)
        model.save(self._folder(k) / "model.npz")
        out: dict[str, Any] = {"n_labels": len(labelled)}
        if self.validation:
            validation, _ = delta_targets(self.validation)
            table = errors(predict_all(model, validation, progress=progress))["composite"]
            out["validation"] = {
                key: table[key]
                for key in ("energy_mae_mev_per_atom", "force_mae", "force_rmse")
                if key in table
            }
        return out


SELECTIONS = ("uncertainty", "variance_reduction", "random")


def crystal_score(model: SparseGPR, atoms: Atoms) -> float:
    """The larger of :func:`crystal_uncertainty`'s σ in units of :data:`CRYSTAL_RESOLUTION`.

    Dimensionless: 1 means a σ of 1 kJ/mol per molecule or 0.1 GPa, whichever is larger.
    """
    sigma = crystal_uncertainty(model, atoms)
    return max(sigma[key] / CRYSTAL_RESOLUTION[key] for key in sigma)


def _provenance(frame: Atoms, start: Atoms, source: str) -> None:
    """Where a candidate came from: ``source``, and the start's ``system`` name if it has one."""
    frame.info["source"] = source
    if "system" in start.info:
        frame.info["system"] = start.info["system"]


def _model_score(model: SparseGPR, frame: Atoms, score: str) -> float:
    """A candidate's uncertainty from the model alone: :func:`crystal_score`, or the
    largest force σ of the correction (eV/Å; the baseline has none)."""
    if score == "crystal":
        return crystal_score(model, frame)
    predicted = model.predict(frame, forces=True, force_uncertainty=True)
    return float(np.max(predicted.forces_uncertainty))


def _cell_candidate(atoms: Atoms, start: Atoms, source: str) -> Atoms:
    """A bare periodic copy of ``atoms`` with its provenance (scored with the pool)."""
    frame = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    _provenance(frame, start, source)
    return frame


def crystal_uncertainty(model: SparseGPR, atoms: Atoms) -> dict[str, float]:
    """The σ a polymorph ranking cares about: energy per molecule and stress.

    Parameters
    ----------
    model : SparseGPR
        Fitted model (with ``uncertainty`` not None).
    atoms : ase.Atoms
        A structure; periodic in all three directions for the stress.

    Returns
    -------
    dict
        ``energy_per_molecule``: σ of the correction energy over the number of
        molecules (eV); ``stress``: the largest σ of a stress component
        (eV/Å³, :meth:`~deltaml.model.SparseGPR.stress_uncertainty`), cells only.
    """
    found = identify_molecules(atoms)
    predicted = model.predict(atoms, forces=False, force_uncertainty=False)
    out = {"energy_per_molecule": float(predicted.energy_uncertainty) / len(found.formulas)}
    if atoms.pbc.all():
        out["stress"] = float(np.max(model.stress_uncertainty(atoms)))
    return out


def select_batch(
    model: SparseGPR,
    candidates: Sequence[Atoms],
    uncertainty: NDArray[np.float64] | None,
    *,
    batch: int,
    pool: int,
    selection: str = "uncertainty",
    seed: int = 0,
    labelled: Sequence[Atoms] | None = None,
    noise: float = 0.1,
) -> list[int]:
    """Indices of a batch to label: uncertain and diverse, most informative, or random.

    ``uncertainty``: the ``pool`` most uncertain candidates are kept; the most
    uncertain is taken first, then farthest-point sampling of the candidates'
    mean SOAP vectors spreads the batch over them. ``variance_reduction``: the
    greedy batch that most lowers the summed posterior variance of the atomic
    energies of all candidates (:func:`variance_reduction_batch`; ``uncertainty``
    and ``pool`` are not used). ``random``: a seeded random batch of all
    candidates (the control experiment).

    Parameters
    ----------
    model : SparseGPR
        Fitted model (its descriptor and kernel place candidates in descriptor space).
    candidates : sequence of ase.Atoms
        Structures to choose from.
    uncertainty : ndarray of shape (n_candidates,) or None
        Their predicted uncertainty (e.g. largest force std, eV/Å); needed by
        ``selection="uncertainty"`` only.
    batch, pool : int
        Batch size, and the number of most uncertain candidates it is drawn from
        (``uncertainty`` only).
    selection : {"uncertainty", "variance_reduction", "random"}
    seed : int
        Seed of the random selection (the other two are deterministic).
    labelled : sequence of ase.Atoms, optional
        The model's training structures: ``variance_reduction`` conditions on
        their environments (without them, on nothing).
    noise : float, default=0.1
        ``variance_reduction`` only: noise variance of an observed atomic
        environment, relative to its prior variance (dimensionless).

    Returns
    -------
    list of int
        Sorted indices into ``candidates``.
    """
    if selection not in SELECTIONS:
        raise ParameterError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    count = min(batch, len(candidates))
    if selection == "random":
        rng = np.random.default_rng(seed)
        return sorted(int(i) for i in rng.choice(len(candidates), size=count, replace=False))
    if selection == "variance_reduction":
        return sorted(variance_reduction_batch(model, candidates, count, labelled=labelled,
                                               noise=noise))  # fmt: skip
    if uncertainty is None:
        raise ParameterError("selection='uncertainty' needs the candidates' uncertainty")
    keep = np.argsort(-np.asarray(uncertainty), kind="stable")[: max(pool, count)]
    vectors = np.array([_mean_descriptor(model, candidates[i]) for i in keep])
    picked = farthest_points(vectors, count, first=0)  # the most uncertain first
    if len(picked) < count:  # duplicates left: the next most uncertain of them
        rest = [i for i in range(len(keep)) if i not in set(picked.tolist())]
        picked = np.concatenate([picked, rest[: count - len(picked)]])
    return sorted(int(keep[i]) for i in picked)


def variance_reduction_batch(
    model: SparseGPR,
    candidates: Sequence[Atoms],
    batch: int,
    *,
    labelled: Sequence[Atoms] | None = None,
    noise: float = 0.1,
) -> list[int]:
    """Greedy batch that most lowers the total posterior variance of the candidates.

    A Gaussian process on atomic environments with the model's kernel
    (k(x̂_i·x̂_j) of the normalised SOAP vectors, zero between elements, unit
    prior variance) is conditioned on every environment of ``labelled``. Labelling a
    structure is taken to observe each of its environments with noise variance
    ``noise``. The structure whose labelling most lowers the summed posterior
    variance of *all* candidate environments is picked, the process is
    conditioned on it (an exact rank update), and so on until ``batch``
    structures are picked.

    Why: the largest uncertainty favours rare structures, while the error to
    lower is spread over all of them; the summed variance reduction counts how
    many environments a label informs (large and representative structures
    first) and, through the conditioning, never picks a near-duplicate of a
    structure already in the batch or the training set. The forces of a
    structure are derivatives of its atomic energies, so an environment
    observed through its forces is the unit of information here; the sparse
    (DTC) approximation of the model is not used, because the model's sparse
    points are chosen again at the next fit.

    Parameters
    ----------
    model : SparseGPR
        Fitted model (descriptor, kernel and ζ).
    candidates : sequence of ase.Atoms
        Structures to choose from.
    batch : int
        Structures to pick (at most ``len(candidates)``).
    labelled : sequence of ase.Atoms, optional
        Structures already labelled (the model's training set).
    noise : float, default=0.1
        Noise variance of an observed environment relative to the prior
        variance (dimensionless, > 0); smaller values weigh novelty more,
        larger ones the number of similar environments.

    Returns
    -------
    list of int
        Indices into ``candidates``, in the order picked.

    Notes
    -----
    Memory and time scale as the square of the number of candidate atoms
    (plus training atoms), e.g. 2000 atoms: 32 MB and about a second per pick.
    """
    if not noise > 0:
        raise ParameterError(f"noise must be positive, got {noise}")
    count = min(int(batch), len(candidates))
    if count < 1:
        return []
    values, numbers, owner = _environments(model, candidates)
    covariance = _environment_kernel(model, values, numbers, values, numbers)
    if labelled:
        # Posterior after the training environments: C = K - K_ct (K_tt + ν I)^-1 K_tc.
        t_values, t_numbers, _ = _environments(model, labelled)
        k_tt = _environment_kernel(model, t_values, t_numbers, t_values, t_numbers)
        k_tt[np.diag_indices_from(k_tt)] += noise
        k_tc = _environment_kernel(model, t_values, t_numbers, values, numbers)
        factor = scipy.linalg.cholesky(k_tt, lower=True, check_finite=False)
        solved = scipy.linalg.solve_triangular(factor, k_tc, lower=True, check_finite=False)
        covariance -= solved.T @ solved
    members = [np.flatnonzero(owner == i) for i in range(len(candidates))]
    picked: list[int] = []
    for _ in range(count):
        best, best_gain, best_update = -1, -np.inf, None
        for i, rows in enumerate(members):
            if i in picked:
                continue
            update = _observation_update(covariance, rows, noise)
            gain = float(np.sum(update**2))  # trace of the variance reduction
            if gain > best_gain:
                best, best_gain, best_update = i, gain, update
        covariance -= best_update.T @ best_update
        picked.append(best)
    return picked


def _environments(
    model: SparseGPR, frames: Sequence[Atoms]
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64]]:
    """Normalised SOAP vectors, elements and structure index of every atom of ``frames``."""
    computed = [model.descriptor_.compute(atoms) for atoms in frames]
    values = np.concatenate([c.values for c in computed])
    numbers = np.concatenate([c.numbers for c in computed])
    owner = np.repeat(np.arange(len(frames)), [len(c.values) for c in computed])
    return values, numbers, owner


def _environment_kernel(
    model: SparseGPR, a: NDArray, za: NDArray, b: NDArray, zb: NDArray
) -> NDArray[np.float64]:
    """The model's kernel between environments (unit prior variance, zero across elements)."""
    k, _, _ = kernel_values(a @ b.T, model.kernel, model.zeta)
    return np.where(za[:, None] == zb[None, :], k, 0.0)


def _observation_update(covariance: NDArray, rows: NDArray, noise: float) -> NDArray:
    """W with C_new = C - WᵀW after observing environments ``rows`` with noise ``noise``."""
    block = covariance[np.ix_(rows, rows)]
    block[np.diag_indices_from(block)] += noise
    factor = scipy.linalg.cholesky(block, lower=True, check_finite=False)
    return scipy.linalg.solve_triangular(factor, covariance[rows], lower=True, check_finite=False)


def _mean_descriptor(model: SparseGPR, atoms: Atoms) -> np.ndarray:
    """Mean normalised SOAP vector of a structure (its point in descriptor space)."""
    return model.descriptor_.compute(atoms).values.mean(axis=0)


def _labels_of(store: LabelStore, record: dict[str, Any]) -> list[Atoms]:
    """The store's labels computed with the method of ``record`` (others are left out)."""
    from deltaml.correction import record_differences

    rows = [a for a in store.labelled() if not record_differences(a.info["method_record"], record)]
    if not rows:
        raise MissingLabelError(f"{store.url} holds no labels of the reference method")
    return rows


def on_the_fly(
    atoms: Atoms,
    store: LabelStore,
    *,
    threshold: float,
    temperature_k: float = 300.0,
    steps: int = 1000,
    timestep_fs: float = 0.5,
    check_every: int = 5,
    reference: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    max_labels: int = 20,
    seed: int = 0,
    workers: int = 1,
) -> dict[str, Any]:
    """MD that labels a frame whenever the force uncertainty exceeds ``threshold``.

    The store must already hold some labels (the first model is fitted on them).
    When the largest predicted force uncertainty (eV/Å) of a checked frame is
    above ``threshold``, the frame is labelled with the reference, the model is
    refitted on the whole store and put into the running calculator, and MD
    continues from the same positions and velocities. At most ``max_labels``
    frames are labelled.

    Returns
    -------
    dict
        ``labelled`` (steps at which a frame was labelled, with its uncertainty
        before and after the refit), ``md`` (the MD summary), ``n_labels``.
    """
    reference = dict(reference or {})
    record = reference_calculator(dict(reference)).record()
    params = {"seed": seed, **(model or {})}

    def fitted() -> SparseGPR:
        targets, terms = delta_targets(_labels_of(store, record))
        return SparseGPR(**params).fit(targets, trained_with=terms)

    calc = DeltaCalculator.from_model(fitted(), force_uncertainty=True)
    work = atoms.copy()
    work.calc = calc
    events: list[dict[str, Any]] = []

    def check(step: int, current: Atoms) -> None:
        sigma = float(np.max(current.calc.results["forces_uncertainty"]))
        if sigma <= threshold or len(events) >= max_labels:
            return
        frame = Atoms(current.numbers, current.positions, cell=current.cell, pbc=current.pbc)
        label_structures([frame], store, reference=reference, workers=workers, progress=False)
        current.calc.correction = fitted()  # resets the calculator's results
        current.calc.get_forces(current)
        after = float(np.max(current.calc.results["forces_uncertainty"]))
        events.append({"step": step, "uncertainty_before": sigma, "uncertainty_after": after})

    summary = run_md(
        work, temperature_k=temperature_k, steps=steps, timestep_fs=timestep_fs,
        interval=check_every, seed=seed, observer=check,
    )  # fmt: skip
    return {"labelled": events, "md": summary, "n_labels": len(store)}
