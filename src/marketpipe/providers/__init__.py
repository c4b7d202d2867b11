"""Vendor adapters. Importing the package registers every vendor's config class with core's loader
(:func:`marketpipe.core.config.register_provider_config`); the package root imports it, so
``[providers.<vendor>]`` tables always decode into their vendor's class."""

from marketpipe.providers import alpaca_config, polygon_config, yahoo_config

__all__ = ["alpaca_config", "polygon_config", "yahoo_config"]
