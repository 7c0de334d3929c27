"""Demo model: procedural text-to-image data, attribute checker, small-Infinity training, the demo preset."""
