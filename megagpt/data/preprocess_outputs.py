"""Where preprocessing writes: output names, per-input outputs, and the progress ledger that makes runs resumable.

Three layouts, chosen per run:
  one output, no --resume   one builder per key for the whole run (`<prefix>_<key>_document`).
  --output-per-input        one output per input file (`<prefix>_<input stem>_<key>_document`), finalized as
                            soon as that input ends.
  one output with --resume  the same per-input outputs as "parts" under `<prefix>.parts/`, merged (bytes copied,
                            no re-tokenizing) into `<prefix>_<key>_document` at the end, then deleted.
Per-input layouts append one line per finished input to `<prefix>.progress.jsonl` (fsynced; a torn last line
from a crash is ignored), so `--resume` skips what is on disk. Every .bin/.idx appears by atomic rename.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Optional, Sequence

from megagpt.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, merge_datasets
from megagpt.data.readers import strip_compression

_EXTENSIONS = (".jsonl", ".json", ".parquet", ".pq", ".txt", ".text", ".md")


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: <output-prefix>_<json-key>_document."""
    return f"{output_prefix}_{key}_document"


def input_stem(path: str) -> str:
    """The name an input gives its own outputs: `shard_00.jsonl.zst` -> `shard_00`."""
    name = os.path.basename(strip_compression(path))
    for ext in _EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def progress_path(output_prefix: str) -> str:
    """The ledger of finished inputs, next to the outputs."""
    return output_prefix + ".progress.jsonl"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Outputs:
    """Builders for the documents of each input, and the record of which inputs are finished.

    `settings` (what determines the bytes written: keys, tokenizer, eod, formats) heads the ledger; resuming
    under other settings is refused, as is resuming over an input whose size or mtime changed.
    """

    def __init__(self, output_prefix: str, paths: Sequence[str], keys: Sequence[str], dtype, settings: dict,
                 per_input: bool, resume: bool) -> None:
        self.output_prefix, self.paths, self.keys, self.dtype = output_prefix, list(paths), tuple(keys), dtype
        self.per_input = per_input or resume  # resume with one output writes per-input parts, merged at the end
        self.merge_parts = resume and not per_input
        self.ledger = progress_path(output_prefix) if self.per_input else None
        self.done: dict[str, dict] = {}  # input path -> its ledger entry
        self._builders: Optional[list] = None
        self._open_index: Optional[int] = None
        if per_input:
            stems = [input_stem(p) for p in self.paths]
            clash = sorted({s for s in stems if stems.count(s) > 1})
            if clash:
                raise ValueError(f"--output-per-input: several inputs would write the same output name {clash[0]!r}")
        if self.ledger:
            self.done = self._read_ledger(settings) if resume else {}
            if resume:
                self._remove_dead_temporaries()
            if not resume or not os.path.exists(self.ledger):
                os.makedirs(os.path.dirname(os.path.abspath(self.ledger)), exist_ok=True)
                self._write_lines([{"settings": settings}], mode="w")

    def prefix_of(self, index: int) -> str:
        """The output prefix (before _<key>_document) of input `index`."""
        if self.merge_parts:
            return os.path.join(self.output_prefix + ".parts", f"{index:06d}_{input_stem(self.paths[index])}")
        if self.per_input:
            return f"{self.output_prefix}_{input_stem(self.paths[index])}"
        return self.output_prefix

    def outputs(self) -> dict[str, str]:
        """Label -> final output prefix, for the report."""
        if self.per_input and not self.merge_parts:
            return {f"{input_stem(p)}/{k}": output_prefix_for(self.prefix_of(i), k)
                    for i, p in enumerate(self.paths) for k in self.keys}
        return {k: output_prefix_for(self.output_prefix, k) for k in self.keys}

    def _read_ledger(self, settings: dict) -> dict[str, dict]:
        if not os.path.exists(self.ledger):
            return {}
        with open(self.ledger, encoding="utf-8") as f:
            lines = f.read().splitlines()
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a crash mid-append: that input is simply not finished
        if not entries or entries[0].get("settings") != settings:
            raise ValueError(f"{self.ledger} was written by a run with other settings "
                             f"({entries[0].get('settings') if entries else 'none'} vs {settings}); "
                             "delete it or run without --resume")
        done = {}
        for entry in entries[1:]:
            path = entry["input"]
            if path not in self.paths:
                continue
            stat = os.stat(path)
            if (stat.st_size, stat.st_mtime_ns) != (entry["size"], entry["mtime_ns"]):
                raise ValueError(f"--resume: {path} changed since it was preprocessed; delete {self.ledger} "
                                 "to start over")
            prefix = self.prefix_of(self.paths.index(path))
            if all(IndexedDataset.exists(output_prefix_for(prefix, k)) for k in self.keys):
                done[path] = entry
        return done

    def _remove_dead_temporaries(self) -> None:
        """Delete the temporary .bin/.idx files a killed run left (named .tmp-<pid>; live pids are left alone)."""
        prefixes = [self.prefix_of(i) for i, p in enumerate(self.paths) if p not in self.done] + [self.output_prefix]
        for prefix in prefixes:
            for key in self.keys:
                for path in glob.glob(glob.escape(output_prefix_for(prefix, key)) + ".*.tmp-*"):
                    pid = path.rsplit(".tmp-", 1)[1]
                    if pid.isdigit() and not _alive(int(pid)):
                        os.remove(path)

    def _write_lines(self, objs: list, mode: str = "a") -> None:
        with open(self.ledger, mode, encoding="utf-8") as f:
            f.write("".join(json.dumps(o) + "\n" for o in objs))
            f.flush()
            os.fsync(f.fileno())

    def builders(self, index: int) -> list[IndexedDatasetBuilder]:
        """The builders receiving input `index`'s documents (opened on first use)."""
        if self._builders is not None and (not self.per_input or self._open_index == index):
            return self._builders
        self.close_input()
        prefix = self.prefix_of(index)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builders = [IndexedDatasetBuilder(output_prefix_for(prefix, k), self.dtype) for k in self.keys]
        self._open_index = index
        return self._builders

    def finish_input(self, index: int, stats: dict) -> None:
        """Input `index` has no more documents: finalize its outputs (per-input layouts) and record it."""
        if not self.per_input:
            return
        self.builders(index)  # an input without documents still gets (empty) outputs
        for builder in self._builders:
            builder.finalize()
        self._builders, self._open_index = None, None
        stat = os.stat(self.paths[index])
        entry = {"input": self.paths[index], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **stats}
        self._write_lines([entry])
        self.done[self.paths[index]] = entry

    def close_input(self) -> None:
        """Finalize the shared builders (one-output layout); per-input ones are finalized by finish_input."""
        if self._builders is not None and not self.per_input:
            for builder in self._builders:
                builder.finalize()
            self._builders = None

    def abort(self) -> None:
        """Delete the temporary files of whatever is open; finished outputs and the ledger stay."""
        for builder in self._builders or []:
            builder.abort()
        self._builders = None

    def finish_run(self) -> None:
        """Close everything; with parts, merge them in input order into the one output and delete them."""
        if self.per_input:
            self.abort()  # nothing is open after the last finish_input; an input list of zero files opens none
        else:
            if self._builders is None:
                self.builders(0)
            self.close_input()
        if not self.merge_parts:
            return
        for key in self.keys:
            merge_datasets([output_prefix_for(self.prefix_of(i), key) for i in range(len(self.paths))],
                           output_prefix_for(self.output_prefix, key))
        shutil.rmtree(self.output_prefix + ".parts")
        os.remove(self.ledger)
