"""Distillation losses: pure functions of tensors, registered by name.

A new method is one file here with its ``@register_loss`` line: importing this package imports
every module in it, and each registers its losses as it is imported (see :func:`_register_all`).
The functions and classes below are the package's public names; the registry does not depend on
this list.
"""

import importlib
import pkgutil

from distill.losses.at import at_loss
from distill.losses.bce import bce_loss
from distill.losses.box_kd import box_kd_loss
from distill.losses.cc import cc_loss
from distill.losses.ce import ce_loss
from distill.losses.centernet import centernet_loss
from distill.losses.crd import CRDLoss
from distill.losses.dist import dist_loss
from distill.losses.dkd import dkd_loss
from distill.losses.embedding_cosine import embedding_cosine_loss
from distill.losses.fg_feature import fg_feature_loss
from distill.losses.fsp import FSPLoss
from distill.losses.heatmap_kd import heatmap_kd_loss
from distill.losses.hint import hint_loss
from distill.losses.kd import kd_loss
from distill.losses.kd_std import kd_std_loss
from distill.losses.listnet_kd import listnet_kd_loss
from distill.losses.nst import nst_loss
from distill.losses.pair_cosine import pair_cosine_loss
from distill.losses.pkt import pkt_loss
from distill.losses.pointwise_kd import pointwise_kd_loss
from distill.losses.ranknet_kd import ranknet_kd_loss
from distill.losses.rd import rd_loss
from distill.losses.registry import LOSSES, LossSpec, get_loss, register_loss
from distill.losses.reviewkd import ReviewKDLoss
from distill.losses.rkd import rkd_loss
from distill.losses.sp import sp_loss
from distill.losses.tf_kd import tf_kd_loss
from distill.losses.token_divergences import (
    TopK, token_ce_loss, token_fkl_loss, token_gjsd_loss, token_rkl_loss, token_skl_loss, token_srkl_loss,
    token_tvd_loss,
)
from distill.losses.vid import VIDLoss

__all__ = ["LOSSES", "LossSpec", "get_loss", "register_loss", "kd_loss", "ce_loss", "hint_loss",
           "dkd_loss", "dist_loss", "kd_std_loss", "tf_kd_loss", "at_loss", "nst_loss",
           "sp_loss", "rkd_loss", "pkt_loss", "cc_loss",
           "VIDLoss", "FSPLoss", "ReviewKDLoss", "CRDLoss",
           "bce_loss", "pointwise_kd_loss", "ranknet_kd_loss", "listnet_kd_loss", "rd_loss",
           "TopK", "token_fkl_loss", "token_rkl_loss", "token_gjsd_loss", "token_tvd_loss", "token_skl_loss",
           "token_srkl_loss", "token_ce_loss",
           "centernet_loss", "heatmap_kd_loss", "fg_feature_loss", "box_kd_loss",
           "embedding_cosine_loss", "pair_cosine_loss"]


def _register_all() -> None:
    """Import every module of this package (but the registry): each registers its losses on import,
    so a loss file that no import above names is registered all the same."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "registry":
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()
