"""README.md's flag table is the parser's: a flag added without documentation, or a stale row, fails here."""
import os

from megagpt.cli import flag_table

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_flag_table_matches_the_parser():
    text = open(README).read()
    block = text.split("<!-- flags:begin -->\n", 1)[1].split("\n<!-- flags:end -->", 1)[0]
    assert block == flag_table(), "regenerate: python -c 'from megagpt.cli import flag_table; print(flag_table())'"
