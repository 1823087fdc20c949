"""Base model for every config section: unknown keys are errors, every field carries a help string."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config block: extra keys forbidden, assignment validated, values frozen after load."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
