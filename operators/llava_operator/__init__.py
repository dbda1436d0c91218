"""kopf operator for the LlavaPipeline custom resource (group llava.dev).

Run with `kopf run -m llava_operator.handlers --standalone --namespace NS` (see README.md).
This package imports neither torch nor the `llava` model library: it only writes Kubernetes objects.
"""

GROUP = "llava.dev"
VERSION = "v1alpha1"
PLURAL = "llavapipelines"
KIND = "LlavaPipeline"
