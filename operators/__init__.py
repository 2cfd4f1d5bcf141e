"""Built-in measurement operators of deft.

They are registered under the entry-point group ``deft.operators`` in pyproject.toml, exactly like a
third-party plugin, and are used through :func:`deftcli.operators.create`:

- ``superres`` (:class:`operators.superres.SuperResolution`): mean over factor × factor blocks;
- ``blur`` (:class:`operators.blur.Blur`): circular convolution with a Gaussian, uniform or image kernel;
- ``inpaint`` (:class:`operators.inpaint.Inpaint`): keep the pixels of a box, random or image mask.
"""
