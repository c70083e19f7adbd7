"""Built-in problems for `CodeEnv`: small, self-checking, graded by difficulty.

Every problem has a reference solution and at least four test cases including edge
cases (empty input, single element, negative numbers, ties). All arguments and expected
values are plain JSON (lists, not tuples or sets), so items can be logged or exported
as JSON lines unchanged; problems whose natural answer is unordered ask for a sorted one.

The set is meant for smoke tests, demos and small-model runs, not as a benchmark: the
tasks are classic exercises a model may have seen, which is fine for checking that the
training loop improves per-test-case accuracy from rich feedback.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

__all__ = ["PROBLEMS", "CodeProblem", "builtin_problems"]


@dataclass(frozen=True)
class CodeProblem:
    name: str
    difficulty: str  # "easy" | "medium" | "hard"
    entry_point: str
    prompt: str
    solution: str
    tests: tuple[dict[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        """The form `CodeEnv` consumes (same as a loaded JSON-lines problem)."""
        return {
            "name": self.name,
            "difficulty": self.difficulty,
            "entry_point": self.entry_point,
            "prompt": self.prompt,
            "solution": self.solution,
            "prologue": "",
            "cases": [dict(t, kwargs={}) for t in self.tests],
        }


def _t(*args: Any, expected: Any) -> dict[str, Any]:
    return {"args": list(args), "expected": expected}


def _reflow(text: str) -> str:
    """Join the hard-wrapped lines of each paragraph: the source is wrapped for reading
    here, the model should see plain paragraphs."""
    paragraphs = textwrap.dedent(text).strip().split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _p(
    name: str, difficulty: str, entry: str, prompt: str, solution: str, *tests: dict[str, Any]
) -> CodeProblem:
    return CodeProblem(
        name=name,
        difficulty=difficulty,
        entry_point=entry,
        prompt=_reflow(prompt),
        solution=textwrap.dedent(solution).strip() + "\n",
        tests=tuple(tests),
    )


# ---------------------------------------------------------------------------------------
# easy

_EASY = [
    _p(
        "sum_digits",
        "easy",
        "sum_digits",
        """
        Write a function `sum_digits(n: int) -> int` that returns the sum of the decimal
        digits of the integer `n`. The sign is ignored: sum_digits(-123) == 6.
        """,
        """
        def sum_digits(n: int) -> int:
            return sum(int(d) for d in str(abs(n)))
        """,
        _t(0, expected=0),
        _t(123, expected=6),
        _t(-4070, expected=11),
        _t(10**18, expected=1),
        _t(9, expected=9),
    ),
    _p(
        "reverse_words",
        "easy",
        "reverse_words",
        """
        Write a function `reverse_words(s: str) -> str` that returns the words of `s` in
        reverse order, separated by single spaces, without leading or trailing spaces.
        Words are maximal runs of non-whitespace characters.
        Example: reverse_words("  the sky  is blue ") == "blue is sky the".
        """,
        """
        def reverse_words(s: str) -> str:
            return " ".join(reversed(s.split()))
        """,
        _t("hello world", expected="world hello"),
        _t("  many   spaces here ", expected="here spaces many"),
        _t("", expected=""),
        _t("single", expected="single"),
        _t("a\tb\nc", expected="c b a"),
    ),
    _p(
        "is_palindrome",
        "easy",
        "is_palindrome",
        """
        Write a function `is_palindrome(s: str) -> bool` that says whether `s` reads the
        same forwards and backwards when only letters and digits are kept and case is
        ignored. The empty string is a palindrome.
        Example: is_palindrome("A man, a plan, a canal: Panama") is True.
        """,
        """
        def is_palindrome(s: str) -> bool:
            kept = [c.lower() for c in s if c.isalnum()]
            return kept == kept[::-1]
        """,
        _t("A man, a plan, a canal: Panama", expected=True),
        _t("race a car", expected=False),
        _t("", expected=True),
        _t(".,", expected=True),
        _t("No 'x' in Nixon", expected=True),
        _t("ab", expected=False),
    ),
    _p(
        "count_vowels",
        "easy",
        "count_vowels",
        """
        Write a function `count_vowels(s: str) -> int` that counts the vowels a, e, i, o, u
        in `s`, in upper or lower case. The letter y is not a vowel.
        """,
        """
        def count_vowels(s: str) -> int:
            return sum(1 for c in s.lower() if c in "aeiou")
        """,
        _t("Hello World", expected=3),
        _t("", expected=0),
        _t("rhythm", expected=0),
        _t("AEIOUaeiou", expected=10),
    ),
    _p(
        "fizzbuzz",
        "easy",
        "fizzbuzz",
        """
        Write a function `fizzbuzz(n: int) -> list[str]` returning the list for the numbers
        1..n where multiples of 3 are "Fizz", multiples of 5 are "Buzz", multiples of both
        are "FizzBuzz" and every other number is its decimal string.
        Example: fizzbuzz(5) == ["1", "2", "Fizz", "4", "Buzz"]. fizzbuzz(0) == [].
        """,
        """
        def fizzbuzz(n: int) -> list[str]:
            out = []
            for i in range(1, n + 1):
                word = ("Fizz" if i % 3 == 0 else "") + ("Buzz" if i % 5 == 0 else "")
                out.append(word or str(i))
            return out
        """,
        _t(0, expected=[]),
        _t(1, expected=["1"]),
        _t(5, expected=["1", "2", "Fizz", "4", "Buzz"]),
        _t(
            15,
            expected=[
                *["1", "2", "Fizz", "4", "Buzz", "Fizz", "7", "8", "Fizz", "Buzz", "11"],
                *["Fizz", "13", "14", "FizzBuzz"],
            ],
        ),
    ),
    _p(
        "second_largest",
        "easy",
        "second_largest",
        """
        Write a function `second_largest(nums: list[int]) -> int | None` that returns the
        second largest *distinct* value in `nums`, or None if there is none.
        Example: second_largest([3, -1, 3, 2]) == 2; second_largest([5, 5]) is None.
        """,
        """
        def second_largest(nums):
            distinct = sorted(set(nums))
            return distinct[-2] if len(distinct) >= 2 else None
        """,
        _t([1, 2, 3], expected=2),
        _t([5, 5, 5], expected=None),
        _t([], expected=None),
        _t([3, -1, 3, 2], expected=2),
        _t([7], expected=None),
        _t([-2, -5], expected=-5),
    ),
    _p(
        "merge_sorted",
        "easy",
        "merge_sorted",
        """
        Write a function `merge_sorted(a: list[int], b: list[int]) -> list[int]` that
        merges two ascending lists into one ascending list, keeping duplicates.
        """,
        """
        def merge_sorted(a, b):
            i = j = 0
            out = []
            while i < len(a) and j < len(b):
                if a[i] <= b[j]:
                    out.append(a[i])
                    i += 1
                else:
                    out.append(b[j])
                    j += 1
            return out + a[i:] + b[j:]
        """,
        _t([1, 3, 5], [2, 4, 6], expected=[1, 2, 3, 4, 5, 6]),
        _t([], [], expected=[]),
        _t([1, 1], [1], expected=[1, 1, 1]),
        _t([], [0, 2], expected=[0, 2]),
        _t([-3, 10], [-5, -4, 11], expected=[-5, -4, -3, 10, 11]),
    ),
    _p(
        "running_sum",
        "easy",
        "running_sum",
        """
        Write a function `running_sum(nums: list[int]) -> list[int]` whose i-th element is
        nums[0] + ... + nums[i].
        """,
        """
        def running_sum(nums):
            out, total = [], 0
            for x in nums:
                total += x
                out.append(total)
            return out
        """,
        _t([1, 2, 3, 4], expected=[1, 3, 6, 10]),
        _t([], expected=[]),
        _t([5], expected=[5]),
        _t([3, -3, 2], expected=[3, 0, 2]),
    ),
    _p(
        "char_frequency",
        "easy",
        "char_frequency",
        """
        Write a function `char_frequency(s: str) -> dict[str, int]` mapping each character
        of `s` (case-sensitive, spaces included) to how often it occurs.
        """,
        """
        def char_frequency(s):
            counts = {}
            for c in s:
                counts[c] = counts.get(c, 0) + 1
            return counts
        """,
        _t("hello", expected={"h": 1, "e": 1, "l": 2, "o": 1}),
        _t("", expected={}),
        _t("aaa", expected={"a": 3}),
        _t("a bA", expected={"a": 1, " ": 1, "b": 1, "A": 1}),
    ),
    _p(
        "celsius_to_fahrenheit",
        "easy",
        "c_to_f",
        """
        Write a function `c_to_f(celsius: float) -> float` converting degrees Celsius to
        degrees Fahrenheit (F = C * 9 / 5 + 32).
        """,
        """
        def c_to_f(celsius):
            return celsius * 9 / 5 + 32
        """,
        _t(0, expected=32.0),
        _t(100, expected=212.0),
        _t(-40, expected=-40.0),
        _t(36.6, expected=97.88),
    ),
    _p(
        "dedupe",
        "easy",
        "dedupe",
        """
        Write a function `dedupe(items: list) -> list` that removes repeated elements,
        keeping the first occurrence of each and the original order. Elements are
        hashable.
        """,
        """
        def dedupe(items):
            seen = set()
            out = []
            for x in items:
                if x not in seen:
                    seen.add(x)
                    out.append(x)
            return out
        """,
        _t([1, 2, 1, 3, 2], expected=[1, 2, 3]),
        _t([], expected=[]),
        _t(["b", "a", "b"], expected=["b", "a"]),
        _t([1, 1, 1], expected=[1]),
    ),
    _p(
        "factorial",
        "easy",
        "factorial",
        """
        Write a function `factorial(n: int) -> int` returning n! for n >= 0 (0! = 1).
        Results can exceed 64 bits.
        """,
        """
        def factorial(n):
            result = 1
            for i in range(2, n + 1):
                result *= i
            return result
        """,
        _t(0, expected=1),
        _t(1, expected=1),
        _t(5, expected=120),
        _t(20, expected=2432902008176640000),
        _t(25, expected=15511210043330985984000000),
    ),
    _p(
        "title_case",
        "easy",
        "title_case",
        """
        Write a function `title_case(s: str) -> str` that upper-cases the first character
        of every space-separated word and lower-cases the rest of it. Keep the spacing
        exactly as in the input. Example: title_case("  mIxEd CaSe") == "  Mixed Case".
        """,
        """
        def title_case(s):
            return " ".join(w[:1].upper() + w[1:].lower() for w in s.split(" "))
        """,
        _t("hello world", expected="Hello World"),
        _t("", expected=""),
        _t("mIxEd CaSe", expected="Mixed Case"),
        _t("  two  spaces", expected="  Two  Spaces"),
        _t("x", expected="X"),
    ),
    _p(
        "count_words",
        "easy",
        "count_words",
        """
        Write a function `count_words(text: str) -> int` returning the number of words,
        where words are separated by any amount of whitespace.
        """,
        """
        def count_words(text):
            return len(text.split())
        """,
        _t("", expected=0),
        _t("one", expected=1),
        _t("  a  b\tc\n", expected=3),
        _t("hello, world!", expected=2),
    ),
    _p(
        "flatten_once",
        "easy",
        "flatten_once",
        """
        Write a function `flatten_once(lists: list[list]) -> list` that concatenates the
        inner lists, one level deep only: nested lists inside them stay as they are.
        """,
        """
        def flatten_once(lists):
            return [x for inner in lists for x in inner]
        """,
        _t([[1, 2], [3], []], expected=[1, 2, 3]),
        _t([], expected=[]),
        _t([[], []], expected=[]),
        _t([[1, [2]], [3]], expected=[1, [2], 3]),
    ),
    _p(
        "max_consecutive_ones",
        "easy",
        "max_consecutive_ones",
        """
        Write a function `max_consecutive_ones(bits: list[int]) -> int` returning the
        length of the longest run of 1s in a list of 0s and 1s.
        """,
        """
        def max_consecutive_ones(bits):
            best = run = 0
            for b in bits:
                run = run + 1 if b == 1 else 0
                best = max(best, run)
            return best
        """,
        _t([1, 1, 0, 1, 1, 1], expected=3),
        _t([], expected=0),
        _t([0, 0], expected=0),
        _t([1], expected=1),
    ),
    _p(
        "digital_root",
        "easy",
        "digital_root",
        """
        Write a function `digital_root(n: int) -> int` for n >= 0: repeatedly replace n by
        the sum of its digits until a single digit remains. digital_root(942) == 6.
        """,
        """
        def digital_root(n):
            while n >= 10:
                n = sum(int(d) for d in str(n))
            return n
        """,
        _t(0, expected=0),
        _t(16, expected=7),
        _t(942, expected=6),
        _t(999999999999, expected=9),
    ),
    _p(
        "is_leap_year",
        "easy",
        "is_leap_year",
        """
        Write a function `is_leap_year(year: int) -> bool` for the Gregorian calendar:
        divisible by 4, except centuries, except centuries divisible by 400.
        """,
        """
        def is_leap_year(year):
            return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        """,
        _t(2000, expected=True),
        _t(1900, expected=False),
        _t(2024, expected=True),
        _t(2023, expected=False),
        _t(2100, expected=False),
    ),
]

# ---------------------------------------------------------------------------------------
# medium

_MEDIUM = [
    _p(
        "two_sum",
        "medium",
        "two_sum",
        """
        Write a function `two_sum(nums: list[int], target: int) -> list[int]` returning the
        indices [i, j], i < j, of the two elements that add up to `target`. Exactly one
        such pair exists.
        """,
        """
        def two_sum(nums, target):
            seen = {}
            for j, x in enumerate(nums):
                if target - x in seen:
                    return [seen[target - x], j]
                seen.setdefault(x, j)
            return []
        """,
        _t([2, 7, 11, 15], 9, expected=[0, 1]),
        _t([3, 2, 4], 6, expected=[1, 2]),
        _t([3, 3], 6, expected=[0, 1]),
        _t([-1, -2, -3, -4, -5], -8, expected=[2, 4]),
        _t([0, 4, 3, 0], 0, expected=[0, 3]),
    ),
    _p(
        "valid_brackets",
        "medium",
        "valid_brackets",
        """
        Write a function `valid_brackets(s: str) -> bool`: `s` consists only of the
        characters ()[]{}; return True iff every bracket is closed by the same type in
        the correct order. The empty string is valid.
        """,
        """
        def valid_brackets(s):
            pairs = {")": "(", "]": "[", "}": "{"}
            stack = []
            for c in s:
                if c in pairs:
                    if not stack or stack.pop() != pairs[c]:
                        return False
                else:
                    stack.append(c)
            return not stack
        """,
        _t("()[]{}", expected=True),
        _t("(]", expected=False),
        _t("([)]", expected=False),
        _t("{[]}", expected=True),
        _t("", expected=True),
        _t("(", expected=False),
        _t(")(", expected=False),
    ),
    _p(
        "roman_to_int",
        "medium",
        "roman_to_int",
        """
        Write a function `roman_to_int(s: str) -> int` converting a valid Roman numeral
        (1 to 3999, subtractive notation such as IV and CM) to an integer.
        """,
        """
        def roman_to_int(s):
            values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
            total = 0
            for i, c in enumerate(s):
                v = values[c]
                if i + 1 < len(s) and values[s[i + 1]] > v:
                    total -= v
                else:
                    total += v
            return total
        """,
        _t("III", expected=3),
        _t("IV", expected=4),
        _t("LVIII", expected=58),
        _t("MCMXCIV", expected=1994),
        _t("MMMCMXCIX", expected=3999),
    ),
    _p(
        "int_to_roman",
        "medium",
        "int_to_roman",
        """
        Write a function `int_to_roman(n: int) -> str` converting 1 <= n <= 3999 to a
        Roman numeral in standard subtractive notation (4 is IV, 900 is CM).
        """,
        """
        def int_to_roman(n):
            table = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"),
                     (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"),
                     (4, "IV"), (1, "I")]
            out = []
            for value, symbol in table:
                count, n = divmod(n, value)
                out.append(symbol * count)
            return "".join(out)
        """,
        _t(1, expected="I"),
        _t(4, expected="IV"),
        _t(58, expected="LVIII"),
        _t(1994, expected="MCMXCIV"),
        _t(3999, expected="MMMCMXCIX"),
    ),
    _p(
        "longest_common_prefix",
        "medium",
        "longest_common_prefix",
        """
        Write a function `longest_common_prefix(strs: list[str]) -> str` returning the
        longest string that is a prefix of every string in `strs` ("" for an empty list).
        """,
        """
        def longest_common_prefix(strs):
            if not strs:
                return ""
            prefix = strs[0]
            for s in strs[1:]:
                while not s.startswith(prefix):
                    prefix = prefix[:-1]
            return prefix
        """,
        _t(["flower", "flow", "flight"], expected="fl"),
        _t(["dog", "racecar", "car"], expected=""),
        _t([], expected=""),
        _t(["alone"], expected="alone"),
        _t(["", "a"], expected=""),
        _t(["ab", "ab"], expected="ab"),
    ),
    _p(
        "group_anagrams",
        "medium",
        "group_anagrams",
        """
        Write a function `group_anagrams(words: list[str]) -> list[list[str]]` grouping
        words that are anagrams of each other. Sort the words inside each group, and sort
        the groups by their first word. Duplicates stay.
        Example: group_anagrams(["eat", "tea", "tan", "ate", "nat", "bat"]) ==
        [["ate", "eat", "tea"], ["bat"], ["nat", "tan"]].
        """,
        """
        def group_anagrams(words):
            groups = {}
            for w in words:
                groups.setdefault("".join(sorted(w)), []).append(w)
            return sorted(sorted(g) for g in groups.values())
        """,
        _t(
            ["eat", "tea", "tan", "ate", "nat", "bat"],
            expected=[["ate", "eat", "tea"], ["bat"], ["nat", "tan"]],
        ),
        _t([], expected=[]),
        _t([""], expected=[[""]]),
        _t(["b", "a", "a"], expected=[["a", "a"], ["b"]]),
        _t(
            ["listen", "silent", "enlist", "google"],
            expected=[["enlist", "listen", "silent"], ["google"]],
        ),
    ),
    _p(
        "rotate_matrix",
        "medium",
        "rotate_matrix",
        """
        Write a function `rotate_matrix(m: list[list[int]]) -> list[list[int]]` returning
        a new matrix that is `m` rotated 90 degrees clockwise. `m` is rectangular (not
        necessarily square) and may be empty.
        Example: rotate_matrix([[1, 2], [3, 4]]) == [[3, 1], [4, 2]].
        """,
        """
        def rotate_matrix(m):
            return [list(row) for row in zip(*m[::-1])]
        """,
        _t([[1, 2], [3, 4]], expected=[[3, 1], [4, 2]]),
        _t([[1, 2, 3], [4, 5, 6], [7, 8, 9]], expected=[[7, 4, 1], [8, 5, 2], [9, 6, 3]]),
        _t([], expected=[]),
        _t([[5]], expected=[[5]]),
        _t([[1, 2, 3]], expected=[[1], [2], [3]]),
    ),
    _p(
        "spiral_order",
        "medium",
        "spiral_order",
        """
        Write a function `spiral_order(m: list[list[int]]) -> list[int]` returning the
        elements of the rectangular matrix `m` in clockwise spiral order, starting at the
        top-left corner.
        """,
        """
        def spiral_order(m):
            out = []
            rows = [list(r) for r in m]
            while rows:
                out.extend(rows.pop(0))
                rows = [list(r) for r in zip(*rows)][::-1]
            return out
        """,
        _t([[1, 2, 3], [4, 5, 6], [7, 8, 9]], expected=[1, 2, 3, 6, 9, 8, 7, 4, 5]),
        _t(
            [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]],
            expected=[1, 2, 3, 4, 8, 12, 11, 10, 9, 5, 6, 7],
        ),
        _t([], expected=[]),
        _t([[1], [2], [3]], expected=[1, 2, 3]),
        _t([[7]], expected=[7]),
    ),
    _p(
        "longest_unique_substring",
        "medium",
        "longest_unique_substring",
        """
        Write a function `longest_unique_substring(s: str) -> int` returning the length of
        the longest substring of `s` without repeated characters.
        """,
        """
        def longest_unique_substring(s):
            last = {}
            start = best = 0
            for i, c in enumerate(s):
                if last.get(c, -1) >= start:
                    start = last[c] + 1
                last[c] = i
                best = max(best, i - start + 1)
            return best
        """,
        _t("abcabcbb", expected=3),
        _t("bbbbb", expected=1),
        _t("pwwkew", expected=3),
        _t("", expected=0),
        _t("dvdf", expected=3),
        _t("abba", expected=2),
    ),
    _p(
        "run_length_encode",
        "medium",
        "rle_encode",
        """
        Write a function `rle_encode(s: str) -> str` that replaces each run of equal
        characters by the character followed by the run length (case-sensitive).
        Example: rle_encode("aaabcc") == "a3b1c2".
        """,
        """
        def rle_encode(s):
            out = []
            i = 0
            while i < len(s):
                j = i
                while j < len(s) and s[j] == s[i]:
                    j += 1
                out.append(f"{s[i]}{j - i}")
                i = j
            return "".join(out)
        """,
        _t("aaabcc", expected="a3b1c2"),
        _t("", expected=""),
        _t("a", expected="a1"),
        _t("aaaaaaaaaaaa", expected="a12"),
        _t("abAB", expected="a1b1A1B1"),
    ),
    _p(
        "merge_intervals",
        "medium",
        "merge_intervals",
        """
        Write a function `merge_intervals(intervals: list[list[int]]) -> list[list[int]]`
        merging overlapping closed intervals [start, end] (touching ones, like [1, 4] and
        [4, 5], overlap). Return the merged intervals sorted by start. The input may be
        unsorted.
        """,
        """
        def merge_intervals(intervals):
            merged = []
            for start, end in sorted(intervals):
                if merged and start <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end])
            return merged
        """,
        _t([[1, 3], [2, 6], [8, 10], [15, 18]], expected=[[1, 6], [8, 10], [15, 18]]),
        _t([[1, 4], [4, 5]], expected=[[1, 5]]),
        _t([], expected=[]),
        _t([[5, 6], [1, 2]], expected=[[1, 2], [5, 6]]),
        _t([[1, 10], [2, 3], [4, 5]], expected=[[1, 10]]),
    ),
    _p(
        "primes_up_to",
        "medium",
        "primes_up_to",
        """
        Write a function `primes_up_to(n: int) -> list[int]` returning all primes p with
        p <= n in increasing order. It must handle n up to 10**6 quickly.
        """,
        """
        def primes_up_to(n):
            if n < 2:
                return []
            sieve = bytearray([1]) * (n + 1)
            sieve[0] = sieve[1] = 0
            for i in range(2, int(n ** 0.5) + 1):
                if sieve[i]:
                    sieve[i * i :: i] = bytearray(len(range(i * i, n + 1, i)))
            return [i for i in range(n + 1) if sieve[i]]
        """,
        _t(0, expected=[]),
        _t(1, expected=[]),
        _t(2, expected=[2]),
        _t(10, expected=[2, 3, 5, 7]),
        _t(30, expected=[2, 3, 5, 7, 11, 13, 17, 19, 23, 29]),
    ),
    _p(
        "binary_search",
        "medium",
        "binary_search",
        """
        Write a function `binary_search(nums: list[int], target: int) -> int` returning
        the index of `target` in the ascending list of distinct integers `nums`, or -1.
        Use O(log n) time.
        """,
        """
        def binary_search(nums, target):
            lo, hi = 0, len(nums) - 1
            while lo <= hi:
                mid = (lo + hi) // 2
                if nums[mid] == target:
                    return mid
                if nums[mid] < target:
                    lo = mid + 1
                else:
                    hi = mid - 1
            return -1
        """,
        _t([1, 3, 5, 7, 9], 7, expected=3),
        _t([1, 3, 5, 7, 9], 4, expected=-1),
        _t([], 1, expected=-1),
        _t([5], 5, expected=0),
        _t([1, 2], 2, expected=1),
        _t([-10, -3, 0, 8], -10, expected=0),
    ),
    _p(
        "max_subarray_sum",
        "medium",
        "max_subarray_sum",
        """
        Write a function `max_subarray_sum(nums: list[int]) -> int` returning the largest
        sum of a non-empty contiguous sub-list of the non-empty list `nums`.
        """,
        """
        def max_subarray_sum(nums):
            best = current = nums[0]
            for x in nums[1:]:
                current = max(x, current + x)
                best = max(best, current)
            return best
        """,
        _t([-2, 1, -3, 4, -1, 2, 1, -5, 4], expected=6),
        _t([1], expected=1),
        _t([-3, -1, -2], expected=-1),
        _t([5, 4, -1, 7, 8], expected=23),
    ),
    _p(
        "product_except_self",
        "medium",
        "product_except_self",
        """
        Write a function `product_except_self(nums: list[int]) -> list[int]` whose i-th
        element is the product of all elements of `nums` except nums[i], without using
        division. For a single element the answer is [1].
        """,
        """
        def product_except_self(nums):
            n = len(nums)
            out = [1] * n
            left = 1
            for i in range(n):
                out[i] = left
                left *= nums[i]
            right = 1
            for i in range(n - 1, -1, -1):
                out[i] *= right
                right *= nums[i]
            return out
        """,
        _t([1, 2, 3, 4], expected=[24, 12, 8, 6]),
        _t([-1, 1, 0, -3, 3], expected=[0, 0, 9, 0, 0]),
        _t([2, 3], expected=[3, 2]),
        _t([0, 0], expected=[0, 0]),
        _t([5], expected=[1]),
    ),
    _p(
        "top_k_frequent",
        "medium",
        "top_k_frequent",
        """
        Write a function `top_k_frequent(words: list[str], k: int) -> list[str]` returning
        the k most frequent words, most frequent first; ties are broken alphabetically.
        If there are fewer than k distinct words, return all of them.
        """,
        """
        from collections import Counter

        def top_k_frequent(words, k):
            counts = Counter(words)
            return sorted(counts, key=lambda w: (-counts[w], w))[:k]
        """,
        _t(["i", "love", "leetcode", "i", "love", "coding"], 2, expected=["i", "love"]),
        _t(
            ["the", "day", "is", "sunny", "the", "the", "the", "sunny", "is", "is"],
            4,
            expected=["the", "is", "sunny", "day"],
        ),
        _t([], 3, expected=[]),
        _t(["a"], 5, expected=["a"]),
        _t(["b", "a", "c"], 2, expected=["a", "b"]),
    ),
    _p(
        "caesar_cipher",
        "medium",
        "caesar_cipher",
        """
        Write a function `caesar_cipher(text: str, shift: int) -> str` shifting every ASCII
        letter by `shift` positions in the alphabet (wrapping around, keeping its case);
        other characters are unchanged. `shift` may be negative or larger than 26.
        """,
        """
        def caesar_cipher(text, shift):
            out = []
            for c in text:
                if "a" <= c <= "z":
                    out.append(chr((ord(c) - 97 + shift) % 26 + 97))
                elif "A" <= c <= "Z":
                    out.append(chr((ord(c) - 65 + shift) % 26 + 65))
                else:
                    out.append(c)
            return "".join(out)
        """,
        _t("abc", 1, expected="bcd"),
        _t("xyz", 3, expected="abc"),
        _t("Hello, World!", 13, expected="Uryyb, Jbeyq!"),
        _t("abc", -1, expected="zab"),
        _t("", 5, expected=""),
        _t("Zz", 52, expected="Zz"),
    ),
    _p(
        "pascal_triangle",
        "medium",
        "pascal_triangle",
        """
        Write a function `pascal_triangle(n: int) -> list[list[int]]` returning the first
        n rows of Pascal's triangle. pascal_triangle(3) == [[1], [1, 1], [1, 2, 1]].
        """,
        """
        def pascal_triangle(n):
            rows = []
            for i in range(n):
                row = [1] * (i + 1)
                for j in range(1, i):
                    row[j] = rows[-1][j - 1] + rows[-1][j]
                rows.append(row)
            return rows
        """,
        _t(0, expected=[]),
        _t(1, expected=[[1]]),
        _t(2, expected=[[1], [1, 1]]),
        _t(5, expected=[[1], [1, 1], [1, 2, 1], [1, 3, 3, 1], [1, 4, 6, 4, 1]]),
    ),
]

# ---------------------------------------------------------------------------------------
# hard

_HARD = [
    _p(
        "edit_distance",
        "hard",
        "edit_distance",
        """
        Write a function `edit_distance(a: str, b: str) -> int` returning the Levenshtein
        distance: the minimum number of single-character insertions, deletions and
        substitutions turning `a` into `b`.
        """,
        """
        def edit_distance(a, b):
            prev = list(range(len(b) + 1))
            for i, ca in enumerate(a, 1):
                cur = [i]
                for j, cb in enumerate(b, 1):
                    cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
                prev = cur
            return prev[-1]
        """,
        _t("kitten", "sitting", expected=3),
        _t("", "", expected=0),
        _t("", "abc", expected=3),
        _t("horse", "ros", expected=3),
        _t("intention", "execution", expected=5),
        _t("same", "same", expected=0),
    ),
    _p(
        "lis_length",
        "hard",
        "lis_length",
        """
        Write a function `lis_length(nums: list[int]) -> int` returning the length of the
        longest strictly increasing subsequence of `nums`, in O(n log n) time.
        """,
        """
        from bisect import bisect_left

        def lis_length(nums):
            tails = []
            for x in nums:
                i = bisect_left(tails, x)
                if i == len(tails):
                    tails.append(x)
                else:
                    tails[i] = x
            return len(tails)
        """,
        _t([10, 9, 2, 5, 3, 7, 101, 18], expected=4),
        _t([], expected=0),
        _t([0, 1, 0, 3, 2, 3], expected=4),
        _t([7, 7, 7, 7], expected=1),
        _t([5, 4, 3, 2, 1], expected=1),
        _t([1, 2, 3, 4, 5], expected=5),
    ),
    _p(
        "coin_change",
        "hard",
        "coin_change",
        """
        Write a function `coin_change(coins: list[int], amount: int) -> int` returning the
        fewest coins (each denomination usable any number of times) that sum to `amount`,
        or -1 if impossible. coin_change(coins, 0) == 0.
        """,
        """
        def coin_change(coins, amount):
            inf = amount + 1
            best = [0] + [inf] * amount
            for a in range(1, amount + 1):
                for c in coins:
                    if c <= a and best[a - c] + 1 < best[a]:
                        best[a] = best[a - c] + 1
            return best[amount] if best[amount] <= amount else -1
        """,
        _t([1, 2, 5], 11, expected=3),
        _t([2], 3, expected=-1),
        _t([1], 0, expected=0),
        _t([186, 419, 83, 408], 6249, expected=20),
        _t([3, 7], 1, expected=-1),
    ),
    _p(
        "evaluate_expression",
        "hard",
        "evaluate",
        """
        Write a function `evaluate(expr: str) -> int` evaluating an integer expression with
        + - * /, parentheses, unary minus and spaces. * and / bind tighter than + and -,
        operators of equal precedence apply left to right, and / is integer division
        truncating toward zero (7 / -2 == -3). Do not use eval.
        """,
        """
        import re

        def evaluate(expr):
            tokens = re.findall(r"\\d+|[-+*/()]", expr)
            pos = 0

            def peek():
                return tokens[pos] if pos < len(tokens) else None

            def take():
                nonlocal pos
                pos += 1
                return tokens[pos - 1]

            def expression():
                value = term()
                while peek() in ("+", "-"):
                    value = value + term() if take() == "+" else value - term()
                return value

            def term():
                value = factor()
                while peek() in ("*", "/"):
                    if take() == "*":
                        value *= factor()
                    else:
                        d = factor()
                        q = abs(value) // abs(d)
                        value = q if (value >= 0) == (d > 0) else -q
                return value

            def factor():
                tok = take()
                if tok == "-":
                    return -factor()
                if tok == "+":
                    return factor()
                if tok == "(":
                    value = expression()
                    take()
                    return value
                return int(tok)

            return expression()
        """,
        _t("1 + 2 * 3", expected=7),
        _t("(1+2)*3", expected=9),
        _t("7/-2", expected=-3),
        _t("-(4 - 10) / 4", expected=1),
        _t("2*(3+(4-1))*2", expected=24),
        _t("42", expected=42),
        _t("10 - 2 - 3", expected=5),
    ),
    _p(
        "n_queens",
        "hard",
        "n_queens",
        """
        Write a function `n_queens(n: int) -> int` returning the number of ways to place n
        non-attacking queens on an n x n chessboard (n <= 9).
        """,
        """
        def n_queens(n):
            def place(row, cols, diag1, diag2):
                if row == n:
                    return 1
                total = 0
                for c in range(n):
                    if c in cols or row - c in diag1 or row + c in diag2:
                        continue
                    total += place(row + 1, cols | {c}, diag1 | {row - c}, diag2 | {row + c})
                return total

            return place(0, frozenset(), frozenset(), frozenset())
        """,
        _t(1, expected=1),
        _t(2, expected=0),
        _t(3, expected=0),
        _t(4, expected=2),
        _t(6, expected=4),
        _t(8, expected=92),
    ),
    _p(
        "shortest_path_grid",
        "hard",
        "shortest_path",
        """
        Write a function `shortest_path(grid: list[str]) -> int`. The grid is a list of
        equal-length strings of "." (free) and "#" (wall). Return the minimum number of
        steps (up, down, left, right) from the top-left to the bottom-right cell, or -1
        if there is no path or either cell is a wall. A 1x1 free grid needs 0 steps.
        """,
        """
        from collections import deque

        def shortest_path(grid):
            rows, cols = len(grid), len(grid[0])
            if grid[0][0] == "#" or grid[-1][-1] == "#":
                return -1
            dist = {(0, 0): 0}
            queue = deque([(0, 0)])
            while queue:
                r, c = queue.popleft()
                if (r, c) == (rows - 1, cols - 1):
                    return dist[r, c]
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= nr < rows and 0 <= nc < cols and grid[nr][nc] == "." \\
                            and (nr, nc) not in dist:
                        dist[nr, nc] = dist[r, c] + 1
                        queue.append((nr, nc))
            return -1
        """,
        _t(["..", ".."], expected=2),
        _t(["."], expected=0),
        _t(["#."], expected=-1),
        _t([".#", "#."], expected=-1),
        _t([".....", ".###.", "....."], expected=6),
        _t(["..#", "#..", "#.."], expected=4),
    ),
    _p(
        "topological_order",
        "hard",
        "topo_order",
        """
        Write a function `topo_order(n: int, edges: list[list[int]]) -> list[int]`. Nodes
        are 0..n-1 and each edge [u, v] means u must come before v. Return the
        lexicographically smallest valid order, or [] if the edges contain a cycle.
        """,
        """
        import heapq

        def topo_order(n, edges):
            indegree = [0] * n
            succ = [[] for _ in range(n)]
            for u, v in edges:
                succ[u].append(v)
                indegree[v] += 1
            ready = [i for i in range(n) if indegree[i] == 0]
            heapq.heapify(ready)
            order = []
            while ready:
                u = heapq.heappop(ready)
                order.append(u)
                for v in succ[u]:
                    indegree[v] -= 1
                    if indegree[v] == 0:
                        heapq.heappush(ready, v)
            return order if len(order) == n else []
        """,
        _t(4, [[0, 1], [0, 2], [1, 3], [2, 3]], expected=[0, 1, 2, 3]),
        _t(2, [[0, 1], [1, 0]], expected=[]),
        _t(3, [], expected=[0, 1, 2]),
        _t(3, [[2, 0], [2, 1]], expected=[2, 0, 1]),
        _t(1, [], expected=[0]),
        _t(5, [[4, 0], [3, 0], [1, 2]], expected=[1, 2, 3, 4, 0]),
    ),
    _p(
        "lru_cache_simulation",
        "hard",
        "lru_simulate",
        """
        Write a function `lru_simulate(capacity: int, ops: list[list]) -> list[int]`
        simulating a least-recently-used cache with the given capacity (>= 1). Each op is
        ["put", key, value] or ["get", key]. A get returns the value or -1 and marks the
        key as recently used; a put inserts or updates (also marking it used) and, when
        the cache is over capacity, evicts the least recently used key. Return the
        results of the gets in order.
        """,
        """
        from collections import OrderedDict

        def lru_simulate(capacity, ops):
            cache = OrderedDict()
            out = []
            for op in ops:
                if op[0] == "get":
                    key = op[1]
                    if key in cache:
                        cache.move_to_end(key)
                        out.append(cache[key])
                    else:
                        out.append(-1)
                else:
                    _, key, value = op
                    cache[key] = value
                    cache.move_to_end(key)
                    if len(cache) > capacity:
                        cache.popitem(last=False)
            return out
        """,
        _t(
            2,
            [
                *[["put", 1, 1], ["put", 2, 2], ["get", 1], ["put", 3, 3], ["get", 2]],
                *[["put", 4, 4], ["get", 1], ["get", 3], ["get", 4]],
            ],
            expected=[1, -1, -1, 3, 4],
        ),
        _t(1, [["get", 5]], expected=[-1]),
        _t(1, [["put", 1, 1], ["put", 1, 2], ["get", 1]], expected=[2]),
        _t(
            2,
            [["put", 1, 1], ["put", 2, 2], ["put", 1, 10], ["put", 3, 3], ["get", 2], ["get", 1]],
            expected=[-1, 10],
        ),
        _t(3, [], expected=[]),
    ),
    _p(
        "running_median",
        "hard",
        "running_median",
        """
        Write a function `running_median(nums: list[int]) -> list[float]` whose i-th element
        is the median of nums[0..i] as a float (the mean of the two middle values for an
        even count). It must be fast for 10**5 numbers.
        """,
        """
        import heapq

        def running_median(nums):
            low, high = [], []  # max-heap (negated) and min-heap
            out = []
            for x in nums:
                if low and x > -low[0]:
                    heapq.heappush(high, x)
                else:
                    heapq.heappush(low, -x)
                if len(low) > len(high) + 1:
                    heapq.heappush(high, -heapq.heappop(low))
                elif len(high) > len(low):
                    heapq.heappush(low, -heapq.heappop(high))
                if len(low) > len(high):
                    out.append(float(-low[0]))
                else:
                    out.append((-low[0] + high[0]) / 2)
            return out
        """,
        _t([1, 2, 3], expected=[1.0, 1.5, 2.0]),
        _t([], expected=[]),
        _t([5, 15, 1, 3], expected=[5.0, 10.0, 5.0, 4.0]),
        _t([-1, -1], expected=[-1.0, -1.0]),
        _t([2, 1, 4, 3], expected=[2.0, 1.5, 2.0, 2.5]),
    ),
    _p(
        "word_ladder",
        "hard",
        "word_ladder",
        """
        Write a function `word_ladder(begin: str, end: str, words: list[str]) -> int`
        returning the number of words in the shortest sequence from `begin` to `end` in
        which consecutive words differ in exactly one letter and every word after `begin`
        is in `words`; 0 if there is none. All words have the same length and
        begin != end.
        """,
        """
        from collections import deque

        def word_ladder(begin, end, words):
            allowed = set(words)
            if end not in allowed:
                return 0
            queue = deque([(begin, 1)])
            seen = {begin}
            while queue:
                word, steps = queue.popleft()
                for i in range(len(word)):
                    for ch in "abcdefghijklmnopqrstuvwxyz":
                        nxt = word[:i] + ch + word[i + 1:]
                        if nxt in allowed and nxt not in seen:
                            if nxt == end:
                                return steps + 1
                            seen.add(nxt)
                            queue.append((nxt, steps + 1))
            return 0
        """,
        _t("hit", "cog", ["hot", "dot", "dog", "lot", "log", "cog"], expected=5),
        _t("hit", "cog", ["hot", "dot", "dog", "lot", "log"], expected=0),
        _t("a", "c", ["a", "b", "c"], expected=2),
        _t("abc", "abd", ["abd"], expected=2),
        _t("hot", "dog", ["hot", "dog"], expected=0),
    ),
    _p(
        "decode_ways",
        "hard",
        "decode_ways",
        """
        Write a function `decode_ways(s: str) -> int`. Letters A..Z are encoded as 1..26;
        return the number of ways to decode the non-empty digit string `s` (0 if none).
        "06" cannot be decoded ("06" is not a valid code for F).
        """,
        """
        def decode_ways(s):
            prev, cur = 1, 1 if s[0] != "0" else 0
            for i in range(1, len(s)):
                nxt = 0
                if s[i] != "0":
                    nxt += cur
                if 10 <= int(s[i - 1:i + 1]) <= 26:
                    nxt += prev
                prev, cur = cur, nxt
            return cur
        """,
        _t("12", expected=2),
        _t("226", expected=3),
        _t("06", expected=0),
        _t("0", expected=0),
        _t("10", expected=1),
        _t("11106", expected=2),
        _t("1111", expected=5),
    ),
    _p(
        "largest_rectangle",
        "hard",
        "largest_rectangle",
        """
        Write a function `largest_rectangle(heights: list[int]) -> int` returning the area
        of the largest rectangle that fits in a histogram of unit-width bars with the given
        heights, in O(n) time.
        """,
        """
        def largest_rectangle(heights):
            stack = []  # indices of increasing heights
            best = 0
            for i, h in enumerate(heights + [0]):
                while stack and heights[stack[-1]] >= h:
                    top = heights[stack.pop()]
                    left = stack[-1] + 1 if stack else 0
                    best = max(best, top * (i - left))
                stack.append(i)
            return best
        """,
        _t([2, 1, 5, 6, 2, 3], expected=10),
        _t([2, 4], expected=4),
        _t([], expected=0),
        _t([1, 1, 1, 1], expected=4),
        _t([6, 2, 5, 4, 5, 1, 6], expected=12),
    ),
    _p(
        "knapsack",
        "hard",
        "knapsack",
        """
        Write a function `knapsack(weights: list[int], values: list[int], capacity: int)
        -> int` returning the maximum total value of items (each used at most once) whose
        total weight is at most `capacity`.
        """,
        """
        def knapsack(weights, values, capacity):
            best = [0] * (capacity + 1)
            for w, v in zip(weights, values):
                for c in range(capacity, w - 1, -1):
                    best[c] = max(best[c], best[c - w] + v)
            return best[capacity]
        """,
        _t([1, 3, 4, 5], [1, 4, 5, 7], 7, expected=9),
        _t([], [], 10, expected=0),
        _t([5], [10], 4, expected=0),
        _t([2, 2, 2], [3, 3, 3], 6, expected=9),
        _t([10, 20, 30], [60, 100, 120], 50, expected=220),
    ),
    _p(
        "regex_match",
        "hard",
        "regex_match",
        """
        Write a function `regex_match(s: str, p: str) -> bool` implementing full-string
        matching of pattern `p` against `s`, where "." matches any single character and
        "*" matches zero or more of the preceding element. Do not use the re module.
        """,
        """
        from functools import lru_cache

        def regex_match(s, p):
            @lru_cache(maxsize=None)
            def match(i, j):
                if j == len(p):
                    return i == len(s)
                first = i < len(s) and p[j] in (s[i], ".")
                if j + 1 < len(p) and p[j + 1] == "*":
                    return match(i, j + 2) or (first and match(i + 1, j))
                return first and match(i + 1, j + 1)

            return match(0, 0)
        """,
        _t("aa", "a", expected=False),
        _t("aa", "a*", expected=True),
        _t("ab", ".*", expected=True),
        _t("aab", "c*a*b", expected=True),
        _t("mississippi", "mis*is*p*.", expected=False),
        _t("", "a*", expected=True),
        _t("", "", expected=True),
        _t("a", "", expected=False),
    ),
    _p(
        "min_window",
        "hard",
        "min_window",
        """
        Write a function `min_window(s: str, t: str) -> str` returning the shortest
        substring of `s` that contains every character of `t` (with multiplicity); the
        leftmost one if there are several, and "" if there is none.
        """,
        """
        from collections import Counter

        def min_window(s, t):
            need = Counter(t)
            missing = len(t)
            best = (0, 0)
            left = 0
            if not t:
                return ""
            for right, c in enumerate(s, 1):
                if need[c] > 0:
                    missing -= 1
                need[c] -= 1
                if missing == 0:
                    while need[s[left]] < 0:
                        need[s[left]] += 1
                        left += 1
                    if best == (0, 0) or right - left < best[1] - best[0]:
                        best = (left, right)
                    need[s[left]] += 1
                    missing += 1
                    left += 1
            return s[best[0]:best[1]]
        """,
        _t("ADOBECODEBANC", "ABC", expected="BANC"),
        _t("a", "a", expected="a"),
        _t("a", "aa", expected=""),
        _t("", "a", expected=""),
        _t("ab", "b", expected="b"),
        _t("abcab", "ab", expected="ab"),
    ),
    _p(
        "count_islands",
        "hard",
        "count_islands",
        """
        Write a function `count_islands(grid: list[str]) -> int` counting groups of "1"
        cells connected horizontally or vertically in a grid of "1" (land) and "0"
        (water) given as equal-length strings. The grid may be empty.
        """,
        """
        def count_islands(grid):
            seen = set()
            count = 0
            for r in range(len(grid)):
                for c in range(len(grid[r])):
                    if grid[r][c] != "1" or (r, c) in seen:
                        continue
                    count += 1
                    stack = [(r, c)]
                    seen.add((r, c))
                    while stack:
                        y, x = stack.pop()
                        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                            if 0 <= ny < len(grid) and 0 <= nx < len(grid[ny]) \\
                                    and grid[ny][nx] == "1" and (ny, nx) not in seen:
                                seen.add((ny, nx))
                                stack.append((ny, nx))
            return count
        """,
        _t(["11000", "11000", "00100", "00011"], expected=3),
        _t([], expected=0),
        _t(["0"], expected=0),
        _t(["1"], expected=1),
        _t(["101", "010", "101"], expected=5),
    ),
]

PROBLEMS: tuple[CodeProblem, ...] = tuple(_EASY + _MEDIUM + _HARD)


def builtin_problems() -> list[dict[str, Any]]:
    """All built-in problems in the dict form `CodeEnv` uses, in a fixed order."""
    return [p.as_dict() for p in PROBLEMS]
