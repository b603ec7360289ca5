"""Names timm has moved between 1.0.x releases, imported from wherever the installed timm keeps them."""

try:  # timm >= 1.0.16
    from timm.layers import register_notrace_function, register_notrace_module
except ImportError:  # older 1.0.x: FX helpers still live with the feature extraction code
    from timm.models._features_fx import register_notrace_function, register_notrace_module

__all__ = ['register_notrace_function', 'register_notrace_module']
