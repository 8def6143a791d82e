"""leancnn: make convolutional networks cheaper to run, and prove it with honest measurements."""
from .version import __version__  # noqa: E402

from .compress import compress  # noqa: E402  (the function shadows the submodule name on purpose)
from .deploy import deploy, deploy_plan  # noqa: E402  (the function shadows the submodule name on purpose)
from .export import export_run  # noqa: E402
from .measure import count as profile  # noqa: E402
from .methods import apply_methods, parse_method  # noqa: E402
from .models import create_model  # noqa: E402
from .profiling import profile_model  # noqa: E402


def apply_method(model, spec: str):
    """Apply one method spec ('psconv:k=4,period=4', 'PS4_P4') to a model before training."""
    model, _ = apply_methods(model, [spec])
    return model


__all__ = ["__version__", "apply_method", "compress", "deploy", "deploy_plan", "export_run", "apply_methods", "create_model", "parse_method", "profile", "profile_model"]
