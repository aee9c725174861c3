from http import HTTPStatus
from typing import Any

import httpx

from ...client import AuthenticatedClient, Client
from ...models.api_error import ApiError
from ...models.job_view import JobView
from ...models.merge_request import MergeRequest
from ...types import Response


def _get_kwargs(
    *,
    body: MergeRequest,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}

    _kwargs: dict[str, Any] = {
        "method": "post",
        "url": "/v1/merges",
    }

    _kwargs["json"] = body.to_dict()

    headers["Content-Type"] = "application/json"

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> ApiError | JobView:
    if response.status_code == 200:
        response_200 = JobView.from_dict(response.json())

        return response_200

    if response.status_code == 202:
        response_202 = JobView.from_dict(response.json())

        return response_202

    if response.status_code == 400:
        response_400 = ApiError.from_dict(response.json())

        return response_400

    if response.status_code == 401:
        response_401 = ApiError.from_dict(response.json())

        return response_401

    if response.status_code == 403:
        response_403 = ApiError.from_dict(response.json())

        return response_403

    if response.status_code == 408:
        response_408 = ApiError.from_dict(response.json())

        return response_408

    if response.status_code == 409:
        response_409 = ApiError.from_dict(response.json())

        return response_409

    if response.status_code == 413:
        response_413 = ApiError.from_dict(response.json())

        return response_413

    if response.status_code == 415:
        response_415 = ApiError.from_dict(response.json())

        return response_415

    if response.status_code == 422:
        response_422 = ApiError.from_dict(response.json())

        return response_422

    if response.status_code == 500:
        response_500 = ApiError.from_dict(response.json())

        return response_500

    if response.status_code == 502:
        response_502 = ApiError.from_dict(response.json())

        return response_502

    if response.status_code == 503:
        response_503 = ApiError.from_dict(response.json())

        return response_503

    response_default = ApiError.from_dict(response.json())

    return response_default


def _build_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> Response[ApiError | JobView]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    *,
    client: AuthenticatedClient,
    body: MergeRequest,
) -> Response[ApiError | JobView]:
    """Submit a merge.

     JSON (the recipe) or mergekit YAML (`Content-Type: application/yaml`, plus ladle's
    `output: {uri: …}`; over HTTP, model references are storage URLs or, when the server has a
    Hugging Face cache (`--hf-cache`), hub ids `org/name[@revision]`).

    Args:
        body (MergeRequest): A request body as sent to `POST /v1/merges` (and the one-shot CLI).
            Example: {'idempotency_key': 'run-1', 'method': 'linear', 'models': [{'uri':
            'file:///data/ft-a/'}, {'uri': 's3://bucket/ft-b/', 'weight': 2.0}], 'output': {'dtype':
            'bfloat16', 'max_shard_size': '2GB', 'uri': 'file:///data/soups/run-1/'}, 'parameters':
            {'normalize': True}}.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ApiError | JobView]
    """

    kwargs = _get_kwargs(
        body=body,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    *,
    client: AuthenticatedClient,
    body: MergeRequest,
) -> ApiError | JobView | None:
    """Submit a merge.

     JSON (the recipe) or mergekit YAML (`Content-Type: application/yaml`, plus ladle's
    `output: {uri: …}`; over HTTP, model references are storage URLs or, when the server has a
    Hugging Face cache (`--hf-cache`), hub ids `org/name[@revision]`).

    Args:
        body (MergeRequest): A request body as sent to `POST /v1/merges` (and the one-shot CLI).
            Example: {'idempotency_key': 'run-1', 'method': 'linear', 'models': [{'uri':
            'file:///data/ft-a/'}, {'uri': 's3://bucket/ft-b/', 'weight': 2.0}], 'output': {'dtype':
            'bfloat16', 'max_shard_size': '2GB', 'uri': 'file:///data/soups/run-1/'}, 'parameters':
            {'normalize': True}}.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ApiError | JobView
    """

    return sync_detailed(
        client=client,
        body=body,
    ).parsed


async def asyncio_detailed(
    *,
    client: AuthenticatedClient,
    body: MergeRequest,
) -> Response[ApiError | JobView]:
    """Submit a merge.

     JSON (the recipe) or mergekit YAML (`Content-Type: application/yaml`, plus ladle's
    `output: {uri: …}`; over HTTP, model references are storage URLs or, when the server has a
    Hugging Face cache (`--hf-cache`), hub ids `org/name[@revision]`).

    Args:
        body (MergeRequest): A request body as sent to `POST /v1/merges` (and the one-shot CLI).
            Example: {'idempotency_key': 'run-1', 'method': 'linear', 'models': [{'uri':
            'file:///data/ft-a/'}, {'uri': 's3://bucket/ft-b/', 'weight': 2.0}], 'output': {'dtype':
            'bfloat16', 'max_shard_size': '2GB', 'uri': 'file:///data/soups/run-1/'}, 'parameters':
            {'normalize': True}}.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ApiError | JobView]
    """

    kwargs = _get_kwargs(
        body=body,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    *,
    client: AuthenticatedClient,
    body: MergeRequest,
) -> ApiError | JobView | None:
    """Submit a merge.

     JSON (the recipe) or mergekit YAML (`Content-Type: application/yaml`, plus ladle's
    `output: {uri: …}`; over HTTP, model references are storage URLs or, when the server has a
    Hugging Face cache (`--hf-cache`), hub ids `org/name[@revision]`).

    Args:
        body (MergeRequest): A request body as sent to `POST /v1/merges` (and the one-shot CLI).
            Example: {'idempotency_key': 'run-1', 'method': 'linear', 'models': [{'uri':
            'file:///data/ft-a/'}, {'uri': 's3://bucket/ft-b/', 'weight': 2.0}], 'output': {'dtype':
            'bfloat16', 'max_shard_size': '2GB', 'uri': 'file:///data/soups/run-1/'}, 'parameters':
            {'normalize': True}}.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ApiError | JobView
    """

    return (
        await asyncio_detailed(
            client=client,
            body=body,
        )
    ).parsed
