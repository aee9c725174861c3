from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.evaluator_spec import EvaluatorSpec
    from ..models.merge_request_parameters import MergeRequestParameters
    from ..models.model_ref_object import ModelRefObject
    from ..models.model_spec import ModelSpec
    from ..models.notify_spec import NotifySpec
    from ..models.output_spec import OutputSpec
    from ..models.slice_spec import SliceSpec
    from ..models.sweep_spec import SweepSpec
    from ..models.trajectory_spec import TrajectorySpec


T = TypeVar("T", bound="MergeRequest")


@_attrs_define
class MergeRequest:
    """A request body as sent to `POST /v1/merges` (and the one-shot CLI).

    Example:
        {'idempotency_key': 'run-1', 'method': 'linear', 'models': [{'uri': 'file:///data/ft-a/'}, {'uri':
            's3://bucket/ft-b/', 'weight': 2.0}], 'output': {'dtype': 'bfloat16', 'max_shard_size': '2GB', 'uri':
            'file:///data/soups/run-1/'}, 'parameters': {'normalize': True}}

    Attributes:
        method (str): The merge method (`linear`, `task_arithmetic`, `ties`, …, `greedy_soup`; see the README). Example:
            linear.
        accept (None | str | Unset): Greedy soup's accept rule: `">="` (the paper, default) or `">"`.
        base_model (ModelRefObject | None | str | Unset):
        chat_template (None | str | Unset): The soup's chat template, written as `chat_template.jinja`: one of
            mergekit's
            templates by name (`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`) or a Jinja
            template (mergekit YAML's `chat_template`).
        evaluator (EvaluatorSpec | None | Unset):
        idempotency_key (None | str | Unset):
        input_dtype (None | str | Unset): Cast every float input tensor to this dtype on load (round-to-nearest-even, as
            torch's
            `Tensor.to`), so the method computes in it: mergekit YAML's `dtype`. Integer and bool
            tensors are copied unchanged.
        max_attempts (int | None | Unset):
        models (list[ModelSpec] | Unset):
        notify (None | NotifySpec | Unset):
        output (OutputSpec | Unset):
        parameters (MergeRequestParameters | Unset):
        priority (int | None | Unset):
        slices (list[SliceSpec] | Unset): Layer ranges from several models, stacked (any method; see `SliceSpec`).
        sweep (None | SweepSpec | Unset):
        tokenizer (Any | Unset): A tokenizer built for the soup (mergekit YAML's `tokenizer` section, and
            `tokenizer_source: union`): `{"source": "union" | "base" | <model>, "tokens": {<token>:
            {"source": <model> | {"kind": "zero"} | {"kind": "model_token", "model": …, "token" |
            "token_id": …}, "force": bool}}, "pad_to_multiple_of": n}`; `tokens` may be a list of
            `{"token": …, …}` entries to keep their order (the ids of new tokens follow it).
        tokenizer_source (None | str | Unset): The soup's tokenizer, built as mergekit builds it (mergekit YAML's
            `tokenizer_source`):
            `base` (the base model's, without its tokens at or beyond its `vocab_size`), `union`
            (the base's and every model's tokens), or a model (a URL, or a hub id: its tokenizer),
            every model's embedding rows permuted onto that vocabulary. When they already sit on
            it, the source's tokenizer files are copied as they are. Written even with
            `output.copy_tokenizer: false`, as mergekit writes the tokenizer a recipe names.
        trajectory (None | TrajectorySpec | Unset):
    """

    method: str
    accept: None | str | Unset = UNSET
    base_model: ModelRefObject | None | str | Unset = UNSET
    chat_template: None | str | Unset = UNSET
    evaluator: EvaluatorSpec | None | Unset = UNSET
    idempotency_key: None | str | Unset = UNSET
    input_dtype: None | str | Unset = UNSET
    max_attempts: int | None | Unset = UNSET
    models: list[ModelSpec] | Unset = UNSET
    notify: None | NotifySpec | Unset = UNSET
    output: OutputSpec | Unset = UNSET
    parameters: MergeRequestParameters | Unset = UNSET
    priority: int | None | Unset = UNSET
    slices: list[SliceSpec] | Unset = UNSET
    sweep: None | SweepSpec | Unset = UNSET
    tokenizer: Any | Unset = UNSET
    tokenizer_source: None | str | Unset = UNSET
    trajectory: None | TrajectorySpec | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.evaluator_spec import EvaluatorSpec
        from ..models.model_ref_object import ModelRefObject
        from ..models.notify_spec import NotifySpec
        from ..models.sweep_spec import SweepSpec
        from ..models.trajectory_spec import TrajectorySpec

        method = self.method

        accept: None | str | Unset
        if isinstance(self.accept, Unset):
            accept = UNSET
        else:
            accept = self.accept

        base_model: dict[str, Any] | None | str | Unset
        if isinstance(self.base_model, Unset):
            base_model = UNSET
        elif isinstance(self.base_model, ModelRefObject):
            base_model = self.base_model.to_dict()
        else:
            base_model = self.base_model

        chat_template: None | str | Unset
        if isinstance(self.chat_template, Unset):
            chat_template = UNSET
        else:
            chat_template = self.chat_template

        evaluator: dict[str, Any] | None | Unset
        if isinstance(self.evaluator, Unset):
            evaluator = UNSET
        elif isinstance(self.evaluator, EvaluatorSpec):
            evaluator = self.evaluator.to_dict()
        else:
            evaluator = self.evaluator

        idempotency_key: None | str | Unset
        if isinstance(self.idempotency_key, Unset):
            idempotency_key = UNSET
        else:
            idempotency_key = self.idempotency_key

        input_dtype: None | str | Unset
        if isinstance(self.input_dtype, Unset):
            input_dtype = UNSET
        else:
            input_dtype = self.input_dtype

        max_attempts: int | None | Unset
        if isinstance(self.max_attempts, Unset):
            max_attempts = UNSET
        else:
            max_attempts = self.max_attempts

        models: list[dict[str, Any]] | Unset = UNSET
        if not isinstance(self.models, Unset):
            models = []
            for models_item_data in self.models:
                models_item = models_item_data.to_dict()
                models.append(models_item)

        notify: dict[str, Any] | None | Unset
        if isinstance(self.notify, Unset):
            notify = UNSET
        elif isinstance(self.notify, NotifySpec):
            notify = self.notify.to_dict()
        else:
            notify = self.notify

        output: dict[str, Any] | Unset = UNSET
        if not isinstance(self.output, Unset):
            output = self.output.to_dict()

        parameters: dict[str, Any] | Unset = UNSET
        if not isinstance(self.parameters, Unset):
            parameters = self.parameters.to_dict()

        priority: int | None | Unset
        if isinstance(self.priority, Unset):
            priority = UNSET
        else:
            priority = self.priority

        slices: list[dict[str, Any]] | Unset = UNSET
        if not isinstance(self.slices, Unset):
            slices = []
            for slices_item_data in self.slices:
                slices_item = slices_item_data.to_dict()
                slices.append(slices_item)

        sweep: dict[str, Any] | None | Unset
        if isinstance(self.sweep, Unset):
            sweep = UNSET
        elif isinstance(self.sweep, SweepSpec):
            sweep = self.sweep.to_dict()
        else:
            sweep = self.sweep

        tokenizer = self.tokenizer

        tokenizer_source: None | str | Unset
        if isinstance(self.tokenizer_source, Unset):
            tokenizer_source = UNSET
        else:
            tokenizer_source = self.tokenizer_source

        trajectory: dict[str, Any] | None | Unset
        if isinstance(self.trajectory, Unset):
            trajectory = UNSET
        elif isinstance(self.trajectory, TrajectorySpec):
            trajectory = self.trajectory.to_dict()
        else:
            trajectory = self.trajectory

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "method": method,
            }
        )
        if accept is not UNSET:
            field_dict["accept"] = accept
        if base_model is not UNSET:
            field_dict["base_model"] = base_model
        if chat_template is not UNSET:
            field_dict["chat_template"] = chat_template
        if evaluator is not UNSET:
            field_dict["evaluator"] = evaluator
        if idempotency_key is not UNSET:
            field_dict["idempotency_key"] = idempotency_key
        if input_dtype is not UNSET:
            field_dict["input_dtype"] = input_dtype
        if max_attempts is not UNSET:
            field_dict["max_attempts"] = max_attempts
        if models is not UNSET:
            field_dict["models"] = models
        if notify is not UNSET:
            field_dict["notify"] = notify
        if output is not UNSET:
            field_dict["output"] = output
        if parameters is not UNSET:
            field_dict["parameters"] = parameters
        if priority is not UNSET:
            field_dict["priority"] = priority
        if slices is not UNSET:
            field_dict["slices"] = slices
        if sweep is not UNSET:
            field_dict["sweep"] = sweep
        if tokenizer is not UNSET:
            field_dict["tokenizer"] = tokenizer
        if tokenizer_source is not UNSET:
            field_dict["tokenizer_source"] = tokenizer_source
        if trajectory is not UNSET:
            field_dict["trajectory"] = trajectory

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.evaluator_spec import EvaluatorSpec
        from ..models.merge_request_parameters import MergeRequestParameters
        from ..models.model_ref_object import ModelRefObject
        from ..models.model_spec import ModelSpec
        from ..models.notify_spec import NotifySpec
        from ..models.output_spec import OutputSpec
        from ..models.slice_spec import SliceSpec
        from ..models.sweep_spec import SweepSpec
        from ..models.trajectory_spec import TrajectorySpec

        d = dict(src_dict)
        method = d.pop("method")

        def _parse_accept(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        accept = _parse_accept(d.pop("accept", UNSET))

        def _parse_base_model(data: object) -> ModelRefObject | None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                componentsschemas_model_ref_type_1 = ModelRefObject.from_dict(data)

                return componentsschemas_model_ref_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(ModelRefObject | None | str | Unset, data)

        base_model = _parse_base_model(d.pop("base_model", UNSET))

        def _parse_chat_template(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        chat_template = _parse_chat_template(d.pop("chat_template", UNSET))

        def _parse_evaluator(data: object) -> EvaluatorSpec | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                evaluator_type_1 = EvaluatorSpec.from_dict(data)

                return evaluator_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(EvaluatorSpec | None | Unset, data)

        evaluator = _parse_evaluator(d.pop("evaluator", UNSET))

        def _parse_idempotency_key(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        idempotency_key = _parse_idempotency_key(d.pop("idempotency_key", UNSET))

        def _parse_input_dtype(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        input_dtype = _parse_input_dtype(d.pop("input_dtype", UNSET))

        def _parse_max_attempts(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        max_attempts = _parse_max_attempts(d.pop("max_attempts", UNSET))

        _models = d.pop("models", UNSET)
        models: list[ModelSpec] | Unset = UNSET
        if _models is not UNSET:
            models = []
            for models_item_data in _models:
                models_item = ModelSpec.from_dict(models_item_data)

                models.append(models_item)

        def _parse_notify(data: object) -> None | NotifySpec | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                notify_type_1 = NotifySpec.from_dict(data)

                return notify_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | NotifySpec | Unset, data)

        notify = _parse_notify(d.pop("notify", UNSET))

        _output = d.pop("output", UNSET)
        output: OutputSpec | Unset
        if isinstance(_output, Unset):
            output = UNSET
        else:
            output = OutputSpec.from_dict(_output)

        _parameters = d.pop("parameters", UNSET)
        parameters: MergeRequestParameters | Unset
        if isinstance(_parameters, Unset):
            parameters = UNSET
        else:
            parameters = MergeRequestParameters.from_dict(_parameters)

        def _parse_priority(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        priority = _parse_priority(d.pop("priority", UNSET))

        _slices = d.pop("slices", UNSET)
        slices: list[SliceSpec] | Unset = UNSET
        if _slices is not UNSET:
            slices = []
            for slices_item_data in _slices:
                slices_item = SliceSpec.from_dict(slices_item_data)

                slices.append(slices_item)

        def _parse_sweep(data: object) -> None | SweepSpec | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                sweep_type_1 = SweepSpec.from_dict(data)

                return sweep_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | SweepSpec | Unset, data)

        sweep = _parse_sweep(d.pop("sweep", UNSET))

        tokenizer = d.pop("tokenizer", UNSET)

        def _parse_tokenizer_source(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        tokenizer_source = _parse_tokenizer_source(d.pop("tokenizer_source", UNSET))

        def _parse_trajectory(data: object) -> None | TrajectorySpec | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                trajectory_type_1 = TrajectorySpec.from_dict(data)

                return trajectory_type_1
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | TrajectorySpec | Unset, data)

        trajectory = _parse_trajectory(d.pop("trajectory", UNSET))

        merge_request = cls(
            method=method,
            accept=accept,
            base_model=base_model,
            chat_template=chat_template,
            evaluator=evaluator,
            idempotency_key=idempotency_key,
            input_dtype=input_dtype,
            max_attempts=max_attempts,
            models=models,
            notify=notify,
            output=output,
            parameters=parameters,
            priority=priority,
            slices=slices,
            sweep=sweep,
            tokenizer=tokenizer,
            tokenizer_source=tokenizer_source,
            trajectory=trajectory,
        )

        return merge_request
