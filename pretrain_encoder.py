"""Train an encoder-conditioned TRM (ETRM): a demonstration encoder replaces the puzzle embedding.

    torchrun --nproc-per-node 4 pretrain_encoder.py --config-name cfg_pretrain_encoder_arc_agi_1 \\
        arch.num_act_steps=4 max_train_groups=32 max_eval_groups=32 +project_name=x +run_name=y
    python pretrain_encoder.py --config-name cfg_pretrain_etrm_arc_agi_1 arch.encoder_type=standard
    python pretrain_encoder.py +experiment=etrm_tiny_cpu data_paths="[data/arc1-encoder-tiny]"

ETRM's command lines (bdsaglam/etrm) run unchanged. Everything is ``pretrain.py``'s: the same
validation, loop, checkpoints, resume, logging, ``torchrun`` and evaluators, and the same exit
codes; only the default configuration differs, ``config/cfg_pretrain_encoder_arc_agi_1.yaml``
(ETRM-FCT, ``arch=etrm_fct``). ``--config-name cfg_pretrain_etrm_arc_agi_1`` (or its older name
``cfg_pretrain_encoder_original_arc_agi_1``) trains ETRM with TRM's dynamic halting
(``arch=etrm``), ``cfg_pretrain_etrmtrm_arc_agi_1`` the recurrent-encoder ETRMTRM
(``arch=etrmtrm``). ``pretrain.py arch=etrm`` on the same data trains the same model.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pretrain import run_from_hydra, start


@hydra.main(config_path="config", config_name="cfg_pretrain_encoder_arc_agi_1", version_base=None)
def main(cfg: DictConfig) -> None:
    run_from_hydra(cfg)


if __name__ == "__main__":
    start(main)
