from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast
from uuid import UUID

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.job_state import JobState
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.error_view import ErrorView
    from ..models.notify_view import NotifyView
    from ..models.progress_snapshot import ProgressSnapshot


T = TypeVar("T", bound="JobView")


@_attrs_define
class JobView:
    """What `GET /v1/merges/{id}` returns.

    Example:
        {'attempts': 1, 'cancel_requested': False, 'created_at': '2026-12-03T10:00:00Z', 'error': None, 'finished_at':
            None, 'id': '019ae4a2-6c1e-7d43-9a57-3f0c2b8e1d20', 'idempotency_key': 'run-1', 'max_attempts': 3, 'notify':
            {'deliveries': [{'attempts': 1, 'created_at': '2026-12-03T10:00:01Z', 'delivered_at': '2026-12-03T10:00:01Z',
            'event': 'running', 'id': 'msg_5f1c0b1e9d2a4c7b8e6f3a2d1c0b9a8e', 'last_attempt_at': '2026-12-03T10:00:01Z',
            'last_error': None, 'last_status': 200, 'next_attempt_at': None, 'state': 'delivered'}], 'events': ['running',
            'succeeded'], 'url': 'https://hooks.example.com/ladle'}, 'progress': {'bytes_read': 1234567890, 'bytes_total':
            1963140608, 'bytes_written': 617283945, 'phase': 'merging', 'tensors_done': 120, 'tensors_total': 291},
            'recipe': {'method': 'linear'}, 'result': None, 'started_at': '2026-12-03T10:00:01Z', 'state': 'running'}

    Attributes:
        attempts (int):
        cancel_requested (bool):
        created_at (datetime.datetime):
        id (UUID):
        max_attempts (int):
        progress (ProgressSnapshot): The public shape of progress (`GET /v1/merges/{id}` → `progress`, and the data of a
            `progress` event).
        recipe (Any): The recipe as stored: explicit models (a trajectory expanded), every URL and hub id as
            the request wrote it.
        state (JobState): Lifecycle state of a job. Stored as text with a CHECK constraint in both backends.
        error (ErrorView | None | Unset):
        finished_at (datetime.datetime | None | Unset):
        idempotency_key (None | str | Unset):
        notify (None | NotifyView | Unset):
        result (Any | Unset): Once succeeded: `uri` (the soup's folder; its `ladle-manifest.json` is the manifest),
            `files`, and `search` for searches; an analysis's numbers.
        search (Any | Unset): A greedy soup's trajectory so far: every evaluation, the accepted models, the best
            score (absent for other jobs).
        started_at (datetime.datetime | None | Unset):
    """

    attempts: int
    cancel_requested: bool
    created_at: datetime.datetime
    id: UUID
    max_attempts: int
    progress: ProgressSnapshot
    recipe: Any
    state: JobState
    error: ErrorView | None | Unset = UNSET
    finished_at: datetime.datetime | None | Unset = UNSET
    idempotency_key: None | str | Unset = UNSET
    notify: None | NotifyView | Unset = UNSET
    result: Any | Unset = UNSET
    search: Any | Unset = UNSET
    started_at: datetime.datetime | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.error_view import ErrorView
        from ..models.notify_view import NotifyView

        attempts = self.attempts

        cancel_requested = self.cancel_requested

        created_at = self.created_at.isoformat()

        id = str(self.id)

        max_attempts = self.max_attempts

        progress = self.progress.to_dict()

        recipe = self.recipe

        state = self.state.value

        error: dict[str, Any] | None | Unset
        if isinstance(self.error, Unset):
            error = UNSET
        elif isinstance(self.error, ErrorView):
            error = self.error.to_dict()
        else:
            error = self.error

        finished_at: None | str | Unset
        if isinstance(self.finished_at, Unset):
            finished_at = UNSET
        elif isinstance(self.finished_at, datetime.datetime):
            finished_at = self.finished_at.isoformat()
        else:
            finished_at = self.finished_at

        idempotency_key: None | str | Unset
        if isinstance(self.idempotency_key, Unset):
            idempotency_key = UNSET
        else:
            idempotency_key = self.idempotency_key

        notify: dict[str, Any] | None | Unset
        if isinstance(self.notify, Unset):
            notify = UNSET
        elif isinstance(self.notify, NotifyView):
            notify = self.notify.to_dict()
        else:
            notify = self.notify

        result = self.result

        search = self.search

        started_at: None | str | Unset
        if isinstance(self.started_at, Unset):
            started_at = UNSET
        elif isinstance(self.started_at, datetime.datetime):
            started_at = self.started_at.isoformat()
        else:
            started_at = self.started_at

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "attempts": attempts,
                "cancel_requested": cancel_requested,
                "created_at": created_at,
                "id": id,
                "max_attempts": max_attempts,
                "progress": progress,
                "recipe": recipe,
                "state": state,
            }
        )
        if error is not UNSET:
            field_dict["error"] = error
        if finished_at is not UNSET:
            field_dict["finished_at"] = finished_at
        if idempotency_key is not UNSET:
            field_dict["idempotency_key"] = idempotency_key
        if notify is not UNSET:
            field_dict["notify"] = notify
        if result is not UNSET:
            field_dict["result"] = result
        if search is not UNSET:
            field_dict["search"] = search
        if started_at is not UNSET:
            field_dict["started_at"] = started_at

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.error_view import ErrorView
        from ..models.notify_view import NotifyView
        from ..models.progress_snapshot import ProgressSnapshot

        d = dict(src_dict)
        attempts = d.pop("attempts")

        cancel_requested = d.pop("cancel_requested")

        created_at = datetime.datetime.fromisoformat(d.pop("created_at"))

        id = UUID(d.pop("id"))

        max_attempts = d.pop("max_attempts")

        progress = ProgressSnapshot.from_dict(d.pop("progress"))

        recipe = d.pop("recipe")

        state = JobState(d.pop("state"))

        def _parse_error(data: object) -> ErrorView | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                error_type_1 = ErrorView.from_dict(data)

                return error_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(ErrorView | None | Unset, data)

        error = _parse_error(d.pop("error", UNSET))

        def _parse_finished_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                finished_at_type_0 = datetime.datetime.fromisoformat(data)

                return finished_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        finished_at = _parse_finished_at(d.pop("finished_at", UNSET))

        def _parse_idempotency_key(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        idempotency_key = _parse_idempotency_key(d.pop("idempotency_key", UNSET))

        def _parse_notify(data: object) -> None | NotifyView | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                notify_type_1 = NotifyView.from_dict(data)

                return notify_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | NotifyView | Unset, data)

        notify = _parse_notify(d.pop("notify", UNSET))

        result = d.pop("result", UNSET)

        search = d.pop("search", UNSET)

        def _parse_started_at(data: object) -> datetime.datetime | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, str):
                    raise TypeError()
                started_at_type_0 = datetime.datetime.fromisoformat(data)

                return started_at_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(datetime.datetime | None | Unset, data)

        started_at = _parse_started_at(d.pop("started_at", UNSET))

        job_view = cls(
            attempts=attempts,
            cancel_requested=cancel_requested,
            created_at=created_at,
            id=id,
            max_attempts=max_attempts,
            progress=progress,
            recipe=recipe,
            state=state,
            error=error,
            finished_at=finished_at,
            idempotency_key=idempotency_key,
            notify=notify,
            result=result,
            search=search,
            started_at=started_at,
        )

        job_view.additional_properties = d
        return job_view

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
