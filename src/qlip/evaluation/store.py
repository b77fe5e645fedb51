"""Generated images on disk with one JSON line per image, so an interrupted run resumes where it
stopped and nothing is generated twice. Images and the record file are written atomically (a
temporary file, then a rename): a kill at any point leaves whole images and whole records; an
image without a record, or a record whose image is missing or torn, is generated again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import (
    crash_point,
    image_is_whole,
    note,
    read_json_dict,
    save_image_atomic,
    write_atomic,
)
from ..pipeline.generate import BITS_FILE, read_bits, save_bits


class ImageStore:
    """``<root>/images/00000.png`` … plus ``<root>/generated.jsonl`` (one record per image).

    In a sharded run (``rank`` > 0) a rank writes its records to ``generated.rank<R>.jsonl``;
    every store reads those too, and rank 0 joins them into ``generated.jsonl``
    (:meth:`merge_shards`) once every rank is done."""

    def __init__(self, root: str | Path, rank: int = 0):
        self.root = Path(root)
        self.image_dir = self.root / "images"
        self.main_file = self.root / "generated.jsonl"
        self.index_file = self.main_file if rank == 0 else self.root / f"generated.rank{rank}.jsonl"
        self._own: set[int] = set()  # the records this store wrote (a rank's share)
        self.image_dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # other ranks start after rank 0 made its store: nobody else writes yet
            for stray in [*self.root.glob(".*.tmp"), *self.image_dir.glob(".*.tmp"),
                          *self.root.glob("bits/.*.tmp")]:
                stray.unlink()  # a write cut by a kill (the folder is locked)
        self.records: dict[int, dict] = self._read_records()

    def shard_files(self) -> list[Path]:
        return sorted(self.root.glob("generated.rank*.jsonl"))

    def merge_shards(self) -> None:
        """Rank 0, after every rank finished: all records into ``generated.jsonl`` (atomically),
        then the ranks' files removed."""
        files = self.shard_files()
        if not files:
            return
        self.records = self._read_records()
        self._write_index(self.main_file, sorted(self.records))
        for path in files:
            path.unlink()

    def _read_records(self) -> dict[int, dict]:
        """The records whose image is whole, by index (the last record of an index wins). A line
        that is not a record (a file of an older qlip cut by a kill) or an image that is missing
        or torn is said, and that image is generated again."""
        records, dropped = {}, []
        for file in [self.main_file, *self.shard_files()]:
            if not file.is_file():
                continue
            text = file.read_bytes().decode("utf-8", errors="replace")
            for number, line in enumerate(text.split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    index = record["index"]
                    if not isinstance(index, int) or index < 0:
                        raise TypeError(index)
                except (json.JSONDecodeError, KeyError, TypeError):
                    dropped.append(f"line {number} of {file.name} is not a record")
                    continue
                records[index] = record
        for index in sorted(records):
            if not image_is_whole(self.path(index)):
                dropped.append(f"image {self.path(index).name} is missing or torn")
                del records[index]
        if dropped:
            note(f"{self.root}: {'; '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}; "
                 f"{'those images are' if len(dropped) > 1 else 'that image is'} generated again")
        return records

    def path(self, index: int) -> Path:
        return self.image_dir / f"{index:05d}.png"

    def missing(self, count: int) -> list[int]:
        return [i for i in range(count) if i not in self.records]

    def add(self, index: int, image: Image.Image, record: dict) -> None:
        """One image and its record (:meth:`add_batch` of one)."""
        self.add_batch([index], [image], [record])

    def add_batch(self, indices: list[int], images: list[Image.Image], records: list[dict]
                  ) -> None:
        """Write the images first (each atomically), then every record in one atomic rewrite of
        ``generated.jsonl``: a record always has its whole image, and no record is torn or
        written twice."""
        for index, image in zip(indices, images):
            save_image_atomic(image, self.path(index))
        crash_point("eval-images-written")
        for index, record in zip(indices, records):
            self.records[index] = {"index": index, **record}
            self._own.add(index)
        mine = sorted(self.records) if self.index_file == self.main_file else sorted(self._own)
        self._write_index(self.index_file, mine)

    def _write_index(self, path: Path, indices: list[int]) -> None:
        write_atomic(path, "".join(json.dumps(self.records[i]) + "\n" for i in indices))

    def check_matches(self, index: int, prompt: str, seed: int) -> None:
        record = self.records.get(index)
        if record and (record.get("prompt") != prompt or record.get("seed") != seed):
            raise ValueError(
                f"{self.root} holds a run with other prompts or seeds (image {index}: "
                f"{record.get('prompt')!r}, seed {record.get('seed')}); use a new --out folder"
            )

    def add_bits(self, indices: list[int], bits: np.ndarray, requested: np.ndarray,
                 unit_names: list[str]) -> None:
        """Keep one batch's bits per step and unit (written before its images: every image on
        record has its bits)."""
        folder = self.root / "bits"
        folder.mkdir(exist_ok=True)
        save_bits(folder / f"{indices[0]:05d}.safetensors", bits, requested, unit_names, indices)

    def write_bits(self, count: int) -> Path | None:
        """Join the batches' bits of the first ``count`` images into ``bits.safetensors`` (the
        format of `qlip generate`'s); None when some image has none (an FP run, or images from
        before this version)."""
        tables = [read_bits(p) for p in sorted((self.root / "bits").glob("*.safetensors"))]
        if not tables:
            return None
        shape = (count, *tables[0]["bits"].shape[1:])
        bits, requested = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        seen = np.zeros(count, bool)
        for table in tables:
            keep = table["index"] < count
            index = table["index"][keep]
            bits[index], requested[index] = table["bits"][keep], table["requested"][keep]
            seen[index] = True
        if not seen.all():
            return None
        path = self.root / BITS_FILE
        save_bits(path, bits, requested, tables[0]["units"])
        return path

    def check_settings(self, settings: dict, write: bool = True) -> None:
        """Refuse to resume a folder whose images were made with other generation settings
        (steps, guidance, batch mode, bit policy…): mixing them would measure neither. The
        settings are kept in ``settings.json``; a folder from before it existed is checked by the
        steps and batch mode its records hold. An empty folder takes the new settings."""
        path = self.root / "settings.json"
        if self.records:
            remedy = "delete it (the records' settings are checked instead)"
            saved = read_json_dict(path, remedy) if path.is_file() else {
                k: v for k, v in next(iter(self.records.values())).items()
                if k in ("steps", "batch_mode")}
            for key, value in saved.items():
                if key in settings and settings[key] != value:
                    raise ValueError(
                        f"{self.root} holds images made with {key}={value!r}; this run asks for "
                        f"{key}={settings[key]!r}. Use a new --out folder (or the same settings "
                        "to resume)")
        if write:
            write_atomic(path, json.dumps(settings, indent=2))

    def load_images(self, count: int) -> torch.Tensor:
        """The first ``count`` images as float [N, 3, H, W] in [0, 1]."""
        arrays = [np.asarray(Image.open(self.path(i)).convert("RGB")) for i in range(count)]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
