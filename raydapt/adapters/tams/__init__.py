"""TAMS (Hou, Salazar, Polovets, TACL 2022): a task-adaptive cell that widens every FFN, its operation
per edge chosen by a controller from the task's embedding."""
from raydapt.adapters.tams.attach import attach_tams, set_task, task_embedding, tams_cells
from raydapt.adapters.tams.config import OPS, TAMSConfig
from raydapt.adapters.tams.layer import TAMSCell, TAMSController

__all__ = ["TAMSConfig", "OPS", "TAMSCell", "TAMSController", "attach_tams", "set_task", "task_embedding",
           "tams_cells"]
