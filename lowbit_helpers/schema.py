"""The bottom floor of the params schema: the strict section base and the leaves that lower
floors read (decode settings), so that decode and evaluation need nothing above them; and
:class:`Skipped`, what a step returns when it did not run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # strict: "2" is not silently an int; forbid: a misspelt key is an error, not a default
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


DECODE_MODES = ("nms", "topk")  # nms: class-aware NMS; topk: YOLOv10's one-to-one top-k


class DecodeCfg(Section):
    mode: Literal[DECODE_MODES] = Field("nms", description="nms: class-aware NMS; topk: YOLOv10 one-to-one top-k")
    conf: float = Field(0.001, ge=0.0, le=1.0)
    iou: float = Field(0.7, gt=0.0, le=1.0)
    max_det: int = Field(300, ge=1)
    pre_nms_topk: int = Field(30000, ge=1)
    multi_label: bool = Field(True, description="NMS candidates are (anchor, class) pairs, as in Ultralytics val")


@dataclass(frozen=True)
class Skipped:
    """A step, or a part of one, that did not run here, and why: the one sentence the report shows
    in its place. Steps return it instead of their result; readers test ``isinstance(x, Skipped)``."""

    why: str

    def record(self) -> dict:
        """The JSON form a stage writes (``{"skipped": why}``)."""
        return {"skipped": self.why}

    @staticmethod
    def read(record: dict) -> Skipped | dict:
        """A recorded result read back: a :class:`Skipped` where the record is one, else the record."""
        return Skipped(record["skipped"]) if isinstance(record, dict) and set(record) == {"skipped"} else record
