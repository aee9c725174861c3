from enum import StrEnum


class Phase(StrEnum):
    EVALUATING = "evaluating"
    MERGING = "merging"
    PLANNING = "planning"
    PREPASS = "prepass"
    PUBLISHING = "publishing"

    def __str__(self) -> str:
        return str(self.value)
