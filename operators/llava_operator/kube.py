"""The few Kubernetes API calls the operator makes, through the official `kubernetes` client.

Handlers are synchronous (kopf runs them in worker threads), so the blocking client is fine here.
Children are filtered by label on this side as well as by the API server: the check costs nothing
and keeps deletion safe even against an API that ignores label selectors.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

RAY_GROUP, RAY_VERSION = "ray.io", "v1"


def load_config() -> None:
    """In-cluster credentials when running in a pod, otherwise the current kubeconfig."""
    try:
        config.load_incluster_config()
    except ConfigException:
        config.load_kube_config()


class RayObjects:
    """Namespaced ray.io/v1 custom objects (rayjobs, rayservices)."""

    def __init__(self, api: client.CustomObjectsApi | None = None) -> None:
        self.api = api or client.CustomObjectsApi()

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False when an object of that name already exists (a restart re-deciding the same step)."""
        try:
            self.api.create_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, body)
            return True
        except ApiException as err:
            if err.status == 409:
                return False
            raise

    def apply(self, plural: str, namespace: str, body: dict[str, Any]) -> None:
        """Create, or merge-patch the spec of the existing object of the same name."""
        if not self.create(plural, namespace, body):
            name = body["metadata"]["name"]
            patch = {"metadata": {"labels": body["metadata"].get("labels", {})}, "spec": body["spec"]}
            self.api.patch_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, name, patch)

    def delete(self, plural: str, namespace: str, name: str) -> bool:
        try:
            self.api.delete_namespaced_custom_object(RAY_GROUP, RAY_VERSION, namespace, plural, name)
            return True
        except ApiException as err:
            if err.status == 404:
                return False
            raise

    def children(self, plural: str, namespace: str, label: str, value: str) -> list[dict[str, Any]]:
        listing = self.api.list_namespaced_custom_object(
            RAY_GROUP, RAY_VERSION, namespace, plural, label_selector=f"{label}={value}")
        return [item for item in listing.get("items", [])
                if (item.get("metadata", {}).get("labels") or {}).get(label) == value]
