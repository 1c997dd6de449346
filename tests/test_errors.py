"""engine.errors: a problem reads as one sentence, whatever punctuation its parts bring."""

from __future__ import annotations

from engine.errors import InputError, Problem


def test_a_problem_names_where_the_column_what_and_what_is_expected():
    problem = Problem("w.csv:3", "'-5' is below 1", "input_tokens", "a whole number from 1")
    assert str(problem) == "w.csv:3: column input_tokens: '-5' is below 1; expected a whole number from 1"


def test_a_message_ending_in_a_full_stop_is_not_followed_by_a_semicolon():
    problem = Problem("plan", "Unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N' (N = GPU index).", "device",
                      "a device of this host")
    assert str(problem) == ("plan: column device: Unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N' "
                            "(N = GPU index); expected a device of this host")
    assert ".;" not in str(InputError(problem))


def test_a_message_alone_keeps_its_full_stop():
    assert str(Problem("plan", "Nothing to run.")) == "plan: Nothing to run."
