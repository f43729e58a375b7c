"""The package version, in the base layer so that every stage can record it without importing the package root."""

VERSION = "0.1.0"
