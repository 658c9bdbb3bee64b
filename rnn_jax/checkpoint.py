"""Checkpointing of a training run: orbax for the data, SHA-256 manifests for integrity.

This is the only module of rnn_jax that imports orbax. :class:`Checkpointer` wraps an
``orbax.checkpoint.CheckpointManager`` over one directory (typically
``workdir/checkpoints``) and stores two items per step:

* ``state``: a pytree of jax / numpy arrays (parameters, optax optimizer state with its
  NamedTuples, scalar int counters, ...), written with ``ocp.args.StandardSave`` and read
  back with ``ocp.args.StandardRestore(abstract_state)``;
* ``meta``: a small JSON dict of host-side metadata (epoch, step within the epoch, data
  seed, ...), written with ``ocp.args.JsonSave``.

On-disk layout::

    <directory>/
      <step>/                        # finalized by orbax (atomic rename of a temp dir)
        _CHECKPOINT_METADATA
        commit_success.txt
        state/...                    # OCDBT / tensorstore files of the pytree
        meta/metadata                # the JSON dict
      <step>.sha256.json             # integrity manifest, written after the step is final
      <step>.orbax-checkpoint-tmp... # only while a save is in flight, or left behind by a
                                     # killed process; never treated as a checkpoint

Integrity scheme. Orbax guarantees atomicity (a step directory appears only once it is
complete) but does not notice flipped bytes. After orbax has finalized a step, the
SHA-256 (and size) of every regular file under ``<directory>/<step>/`` is recorded, keyed
by its POSIX relative path in sorted order, in ``<step>.sha256.json``. The manifest is
written to a temporary file and moved into place with ``os.replace``, so it is either
absent or complete. Before restoring a step the manifest is checked: the set of files,
their sizes and their hashes must all match. A step without a manifest (the process died
between orbax's commit and the manifest write), with an unreadable manifest or with any
mismatch is unusable: :meth:`Checkpointer.restore_latest` logs a warning naming the step
and the reason, and falls back to the next older step. (The writer's
:meth:`Checkpointer.seal_newest` first writes the missing manifest of a newest step
that orbax finished and that restores with finite values, when every older step has
its own: that process was stopped between the two, and a run whose only step it is
could not resume otherwise.) A step whose orbax restore raises is skipped the same
way. Steps beyond ``max_to_keep`` are deleted, with their manifests, after each save
once its manifest is written (a save stopped before then leaves the older steps);
orphaned manifests are removed when a writer opens the directory (a ``read_only``
reader changes nothing).

In a multi-process run only process 0 writes manifests; every process verifies them,
so the directory must be on a file system that all processes see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

__all__ = ["Checkpointer", "CorruptCheckpointError", "MANIFEST_SUFFIX"]

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".sha256.json"
_MANIFEST_VERSION = 1
_MANIFEST_RE = re.compile(r"^(0|[1-9]\d*)" + re.escape(MANIFEST_SUFFIX) + r"$")
_CHUNK = 1 << 20


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step failed its integrity check (or has no manifest)."""


# ----------------------------------------------------------------------------- logging


class _DropOrbaxInfo(logging.Filter):
    """Drops records below WARNING that come from orbax's own source files."""

    _marker = os.sep + "orbax" + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self._marker not in record.pathname


_ORBAX_FILTER = _DropOrbaxInfo()


def _quiet_orbax() -> None:
    # Orbax logs dozens of INFO lines per save through absl. Filter them at the absl
    # logger (idempotent) so that warnings and the program's own INFO logs still pass.
    absl_logger = absl_logging.get_absl_logger()
    if _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


class _DropReadOnlyNotice(logging.Filter):
    """Drops orbax's warning that a manager was opened read-only, as asked."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_warning():
    absl_logger = absl_logging.get_absl_logger()
    notice = _DropReadOnlyNotice()
    absl_logger.addFilter(notice)
    try:
        yield
    finally:
        absl_logger.removeFilter(notice)


# ---------------------------------------------------------------------------- manifests


def _hash_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _list_files(root: str) -> list[str]:
    """Sorted POSIX relative paths of every regular file under ``root``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)


def _digest_tree(root: str) -> dict[str, dict[str, Any]]:
    files = {}
    for rel in _list_files(root):
        full = os.path.join(root, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(full), "sha256": _hash_file(full)}
    return files


def _atomic_write_json(path: str, obj: Any) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# --------------------------------------------------------------------------- checkpointer


def _abstract_leaf(x: Any) -> Any:
    """Turns concrete arrays into ShapeDtypeStructs. A leaf without a sharding (a
    numpy array, ``jax.eval_shape`` output) goes to the default device: without
    one, orbax restores onto the saved topology and refuses another device count."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(x, np.ndarray | np.generic):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x


def _listing(fn: Callable[[], Any], attempts: int = 5) -> Any:
    """``fn()`` (orbax listing a directory's steps), again when it raises
    FileNotFoundError: a training run's ``max_to_keep`` can delete a step between
    orbax listing it and reading it, which a reader of a run still training (a
    generate, a load) met as a traceback (20 of 706 reads in a test)."""
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, NotADirectoryError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


class Checkpointer:
    """Synchronous, integrity-checked checkpoints of ``(state, meta)`` in one directory.

    Args:
      directory: where the step directories live (created if missing), e.g.
        ``workdir/checkpoints``.
      max_to_keep: how many of the most recent steps to keep; older ones (and their
        manifests) are deleted after each save, once its manifest is written (a save
        stopped before then leaves the older steps). ``None`` keeps everything.
      read_only: for a reader (``runs.load``, ``experiments.generate``): nothing in
        ``directory`` is created, pruned or saved (:meth:`save` raises), so a run
        directory that is read-only, or still being written by its training run, is
        read as it is.

    Use as a context manager, or call :meth:`close` when done. One writer per
    directory (a training run holds its run directory's lock): a second
    Checkpointer's saves are seen by :meth:`save`'s check of an existing step, but
    each keeps its own count for ``max_to_keep``.
    """

    def __init__(
        self, directory: str | os.PathLike, max_to_keep: int | None = 3, *, read_only: bool = False
    ):
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):  # (orbax took 0 and then kept no step at all)
            raise ValueError(f"max_to_keep: expected an int >= 1 or None, got {max_to_keep!r}")
        _quiet_orbax()
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = max_to_keep
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"directory: {self.directory} is not a folder")
        if read_only:  # (orbax warns when it has to unset these itself)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, save_interval_steps=0, create=False, read_only=True
            )
        else:
            # max_to_keep is applied here, after the new step's manifest: orbax deleted
            # the old steps before it, so a kill in between left no usable step
            options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True)
        with _without_read_only_warning():
            self._mngr = _listing(lambda: ocp.CheckpointManager(self.directory, options=options))
        self._closed = False
        self.read_only = read_only
        self._is_writer = jax.process_index() == 0 and not read_only
        self._prune_manifests()

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Waits for outstanding orbax work and releases its threads. Idempotent."""
        if not self._closed:
            self._closed = True
            self._mngr.close()

    # -- queries -----------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Sorted steps that orbax considers finalized (not necessarily verified)."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """Newest finalized step, or None. It may still fail verification on restore."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def reload(self) -> None:
        """Rescans the directory (steps written or deleted by another process)."""
        _listing(self._mngr.reload)

    def step_dir(self, step: int) -> str:
        """Path of the directory orbax writes for ``step``."""
        return os.path.join(self.directory, str(int(step)))

    def manifest_path(self, step: int) -> str:
        """Path of the integrity manifest of ``step``."""
        return os.path.join(self.directory, f"{int(step)}{MANIFEST_SUFFIX}")

    def check(self, step: int) -> str | None:
        """Verifies ``step`` against its manifest: None if intact, else the reason."""
        step = int(step)
        root = self.step_dir(step)
        if not os.path.isdir(root):
            return f"step directory {root} does not exist"
        path = self.manifest_path(step)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            return f"no integrity manifest {os.path.basename(path)} (save did not complete)"
        except (OSError, ValueError) as e:
            return f"unreadable integrity manifest {os.path.basename(path)}: {e}"
        if (
            not isinstance(manifest, dict)
            or manifest.get("version") != _MANIFEST_VERSION
            or manifest.get("step") != step
            or not isinstance(manifest.get("files"), dict)
            or not all(isinstance(v, dict) for v in manifest["files"].values())
        ):
            return f"malformed integrity manifest {os.path.basename(path)}"
        expected: dict[str, dict[str, Any]] = manifest["files"]
        try:
            return self._compare(root, expected)
        except (FileNotFoundError, NotADirectoryError) as e:  # the writer's max_to_keep
            return f"step removed while it was checked ({e.filename})"

    @staticmethod
    def _compare(root: str, expected: dict[str, dict[str, Any]]) -> str | None:
        present = _list_files(root)
        missing = sorted(set(expected) - set(present))
        extra = sorted(set(present) - set(expected))
        if missing:
            return f"files missing from the checkpoint: {missing[:5]}"
        if extra:
            return f"files not in the manifest: {extra[:5]}"
        for rel in present:
            full = os.path.join(root, *rel.split("/"))
            want = expected[rel]
            if os.path.getsize(full) != want.get("size"):
                return f"size mismatch in {rel}"
            if _hash_file(full) != want.get("sha256"):
                return f"SHA-256 mismatch in {rel}"
        return None

    def verify(self, step: int) -> bool:
        """True when ``step`` exists and matches its integrity manifest."""
        return self.check(step) is None

    # -- saving ------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` and ``meta`` as ``step`` and returns once it is on disk.

        The save is synchronous: orbax is waited on, the integrity manifest is written
        and the manifests of garbage-collected steps are removed before returning, so it
        is safe to exit right after (e.g. on SIGTERM).

        If ``step`` already exists and verifies, nothing is written and False is
        returned, unless ``force`` is set, in which case it is deleted and rewritten. An
        existing ``step`` that fails verification is always rewritten. Steps need not be
        increasing (e.g. after a fallback restore to an older step, training re-saves
        steps that are older than a corrupt newest one).

        Args:
          step: the training step (a non-negative int) naming the checkpoint.
          state: a pytree of jax / numpy arrays.
          meta: a JSON-serializable dict of host-side metadata (None means ``{}``).
          force: overwrite an existing, intact ``step``.

        Returns:
          True if a checkpoint was written, False if an intact one was kept.
        """
        if self.read_only:
            raise ValueError(f"save: {self.directory} was opened read_only")
        kind = np.asarray(step).dtype
        if isinstance(step, bool) or np.ndim(step) != 0 or not np.issubdtype(kind, np.integer):
            raise ValueError(f"step: expected a non-negative int, got {step!r}")
        step = int(step)  # a Python int, numpy or 0-d JAX integer (e.g. state["step"])
        if step < 0:
            raise ValueError(f"step: expected a non-negative int, got {step}")
        meta = dict(meta) if meta is not None else {}
        try:  # before anything is written (orbax would fail in a thread, files half done)
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta: expected a JSON-serializable dict ({e})") from None
        empty = [
            jax.tree_util.keystr(path)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if np.size(leaf) == 0
        ]
        if empty:
            raise ValueError(f"state: orbax cannot save arrays of size 0: {', '.join(empty)}")
        if step not in self._mngr.all_steps() and os.path.isdir(self.step_dir(step)):
            _listing(self._mngr.reload)  # saved by another Checkpointer since this one listed
        if step in self._mngr.all_steps():
            if not force:
                reason = self.check(step)
                if reason is None:
                    log.info(
                        "Checkpoint step %d already exists and is intact; not re-saving.", step
                    )
                    return False
                log.warning(
                    "Checkpoint step %d exists but is unusable (%s); rewriting it.", step, reason
                )
            self._remove_manifest(step)
            self._mngr.delete(step)
        # A manifest left over from an earlier save of this step must never describe the
        # new files, even if this process dies before writing the new manifest.
        self._remove_manifest(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
        )
        # force=True: orbax's own policy would silently skip steps <= its latest step.
        self._mngr.save(step, args=args, force=True)
        self._mngr.wait_until_finished()
        if self._is_writer:
            self._write_manifest(step)
        self._delete_old_steps()  # (with their manifests: no orphan is left to prune)
        return True

    def _delete_old_steps(self) -> None:
        """Deletes all but the ``max_to_keep`` newest steps (and their manifests)."""
        if self.max_to_keep is None:
            return
        for old in self.all_steps()[: -self.max_to_keep]:
            self._mngr.delete(old)
            self._remove_manifest(old)

    def _write_manifest(self, step: int) -> None:
        _atomic_write_json(
            self.manifest_path(step),
            {
                "version": _MANIFEST_VERSION,
                "step": step,
                "algorithm": "sha256",
                "files": _digest_tree(self.step_dir(step)),
            },
        )

    def seal_newest(self, abstract_state: Any) -> int | None:
        """Writes the integrity manifest of the newest step where orbax finalized it
        but the manifest is missing: the process that saved it was stopped between
        the two (a SIGKILL while hashing). Orbax's atomic commit says its files are
        complete; without this, a run whose only step is that one could not resume.
        Only where every older step has its manifest (else they were lost some other
        way, say a copy without them, and the steps stay unusable), and where the step
        restores into ``abstract_state`` (as :meth:`restore`'s) with every value
        finite: a power loss just after orbax's rename can leave unwritten data, which
        must not be sealed (damage that stays finite cannot be told from data).
        Returns that step, or None (nothing to do, or not the writer: a reader must
        not, since the writer may be hashing it right now).

        For the single writer of the directory only (a training run holds its lock),
        in a one-process run (the restore it tries is collective in several).
        """
        steps = self.all_steps()
        if (
            not self._is_writer
            or jax.process_count() > 1
            or not steps
            or os.path.exists(self.manifest_path(steps[-1]))
        ):
            return None
        step = steps[-1]
        if not os.path.isfile(os.path.join(self.step_dir(step), "commit_success.txt")):
            return None  # (not orbax's finished layout: left unusable)
        if not all(os.path.exists(self.manifest_path(s)) for s in steps[:-1]):
            return None  # manifests lost otherwise (a copy without them): left unusable
        try:
            state, _ = self._restore_verified(step, abstract_state)
            finite = all(
                np.isfinite(np.asarray(x)).all()
                for x in jax.tree.leaves(state)
                if jnp.issubdtype(x.dtype, jnp.inexact)
            )
        except Exception as e:  # noqa: BLE001  (orbax's own failures: unusable)
            log.warning("Checkpoint step %d has no manifest and does not restore: %s", step, e)
            return None
        if not finite:
            log.warning("Checkpoint step %d has no manifest and holds non-finite values", step)
            return None
        try:
            self._write_manifest(step)
        except OSError as e:
            log.warning("Could not write the manifest of checkpoint step %d: %s", step, e)
            return None
        log.warning(
            "Checkpoint step %d had no integrity manifest (its save was stopped after "
            "orbax committed it); wrote it from its files.",
            step,
        )
        return step

    def _remove_manifest(self, step: int) -> None:
        if self._is_writer:
            try:
                os.remove(self.manifest_path(step))
            except FileNotFoundError:
                pass

    def _prune_manifests(self) -> None:
        """Removes manifests whose step directory is gone (garbage-collected by orbax)."""
        if not self._is_writer:
            return
        for name in os.listdir(self.directory):
            m = _MANIFEST_RE.match(name)
            if m and not os.path.isdir(self.step_dir(int(m.group(1)))):
                try:
                    os.remove(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass

    # -- restoring ---------------------------------------------------------------------

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Verifies and restores one ``step``; returns ``(state, meta)``.

        Args:
          step: the step to restore.
          abstract_state: the target pytree, normally ``jax.eval_shape`` output (leaves
            ``jax.ShapeDtypeStruct``, optionally with ``sharding`` set to place the
            arrays, e.g. on a mesh of another number of devices than at save time;
            without one, on the default device). Concrete arrays are accepted too and
            stand for their shape, dtype and sharding.

        Raises:
          CorruptCheckpointError: if the step fails its integrity check.
          Exception: whatever orbax raises if the data cannot be restored.
        """
        step = int(step)
        reason = self.check(step)
        if reason is not None:
            raise CorruptCheckpointError(f"checkpoint step {step} is unusable: {reason}")
        return self._restore_verified(step, abstract_state)

    def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        target = jax.tree.map(_abstract_leaf, abstract_state)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], dict(out["meta"] or {})

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest usable step; returns ``(step, state, meta)`` or None.

        Steps are tried newest first. A step that fails its integrity check (corrupt,
        no manifest) or whose orbax restore raises is skipped with a warning naming the
        step and the reason. Half-written temporary directories are not steps. Returns
        None if there are no steps, or if every step failed its integrity check.

        Raises:
          RuntimeError: if every step failed and at least one of them passed its
            integrity check but could not be restored. That usually means
            ``abstract_state`` does not match what was saved; returning None would let
            a caller silently start from scratch and garbage-collect good checkpoints.
        """
        _listing(self._mngr.reload)
        for _ in range(3):  # again when a writer deleted steps while they were read
            last_error: BaseException | None = None
            vanished = False
            for step in reversed(self.all_steps()):
                reason = self.check(step)
                if reason is not None:
                    vanished |= not os.path.isdir(self.step_dir(step))
                    log.warning("Skipping checkpoint step %d: %s", step, reason)
                    continue
                try:
                    state, meta = self._restore_verified(step, abstract_state)
                except Exception as e:  # any orbax failure makes the step unusable
                    if not os.path.isdir(self.step_dir(step)):  # (max_to_keep, meanwhile)
                        log.warning("Skipping checkpoint step %d: deleted while read", step)
                        vanished = True
                        continue
                    log.warning(
                        "Skipping checkpoint step %d: restore failed: %s: %s",
                        step,
                        type(e).__name__,
                        e,
                    )
                    last_error = e
                    continue
                return step, state, meta
            listed = self.all_steps()
            _listing(self._mngr.reload)  # (the next pass reads this listing)
            if not vanished and self.all_steps() == listed:
                break
        if last_error is not None:
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored; at least one passed "
                "its integrity check but failed to restore (does abstract_state match the "
                "saved state?)"
            ) from last_error
        return None
