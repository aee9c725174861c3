from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.webhook_event import WebhookEvent
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.delivery_record import DeliveryRecord


T = TypeVar("T", bound="NotifyView")


@_attrs_define
class NotifyView:
    """A job's `notify` as its view shows it.

    Attributes:
        events (list[WebhookEvent]):
        url (str):
        deliveries (list[DeliveryRecord] | None | Unset): One per event so far, oldest first (in `GET` of one job;
            absent in listings, event
            streams and webhook bodies).
    """

    events: list[WebhookEvent]
    url: str
    deliveries: list[DeliveryRecord] | None | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        events = []
        for events_item_data in self.events:
            events_item = events_item_data.value
            events.append(events_item)

        url = self.url

        deliveries: list[dict[str, Any]] | None | Unset
        if isinstance(self.deliveries, Unset):
            deliveries = UNSET
        elif isinstance(self.deliveries, list):
            deliveries = []
            for deliveries_type_0_item_data in self.deliveries:
                deliveries_type_0_item = deliveries_type_0_item_data.to_dict()
                deliveries.append(deliveries_type_0_item)

        else:
            deliveries = self.deliveries

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "events": events,
                "url": url,
            }
        )
        if deliveries is not UNSET:
            field_dict["deliveries"] = deliveries

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.delivery_record import DeliveryRecord

        d = dict(src_dict)
        events = []
        _events = d.pop("events")
        for events_item_data in _events:
            events_item = WebhookEvent(events_item_data)

            events.append(events_item)

        url = d.pop("url")

        def _parse_deliveries(data: object) -> list[DeliveryRecord] | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, list):
                    raise TypeError()
                deliveries_type_0 = []
                _deliveries_type_0 = data
                for deliveries_type_0_item_data in _deliveries_type_0:
                    deliveries_type_0_item = DeliveryRecord.from_dict(
                        deliveries_type_0_item_data
                    )

                    deliveries_type_0.append(deliveries_type_0_item)

                return deliveries_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(list[DeliveryRecord] | None | Unset, data)

        deliveries = _parse_deliveries(d.pop("deliveries", UNSET))

        notify_view = cls(
            events=events,
            url=url,
            deliveries=deliveries,
        )

        notify_view.additional_properties = d
        return notify_view

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
