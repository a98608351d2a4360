"""Who started this process, and its place among the others: torchrun, SLURM's srun, or neither."""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str


def launch() -> Launch:
    """Who started this process, and its place among the others."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Launch(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")),
                      int(env.get("LOCAL_WORLD_SIZE", str(world))), "torchrun")
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]).split("(")[0].split(",")[0]
        return Launch(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")),
                      int(per_node), "srun")
    return Launch(0, 1, 0, 1, "none")
