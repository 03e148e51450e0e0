"""The offline demo's parts: tiny local models, their supervised warm-up, the bundled sample task.

Nothing outside this package imports it; configs name its answer checker by ``_target_``.
"""
