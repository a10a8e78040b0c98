"""d3m_lib: the thin library behind the D3M chest X-ray fairness study.

Each module does one job; the numbered notebooks import them and tell the story.
"""

__version__ = "0.1.0"
