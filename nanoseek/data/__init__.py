"""Training data: built-in reasoning tasks, file loaders, document packing and FIM; and prompts
(nanoseek.data.prompts: how a task's problem is put to a model, imported from there).

    from nanoseek.data import get_task, load_data, pack_documents, pack_chat
    from nanoseek.data.prompts import prompt_ids, render_prompt, task_from_spec
"""

from nanoseek.data.fim import fim_transform
from nanoseek.data.loaders import load_data, load_documents
from nanoseek.data.packing import PackedRows, pack_chat, pack_documents, shifted_targets, tokenize_documents
from nanoseek.data.tasks import TASKS, Example, Task, extract_answer, get_task

__all__ = ["TASKS", "Example", "PackedRows", "Task", "extract_answer", "fim_transform", "get_task",
           "load_data", "load_documents", "pack_chat", "pack_documents", "shifted_targets",
           "tokenize_documents"]
