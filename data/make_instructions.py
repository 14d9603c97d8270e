"""Write data/instructions.jsonl: a small Alpaca-format instruction set written for this project.

    python data/make_instructions.py [output]

Deterministic: task generators over word lists written here (arithmetic, comparisons, sorting, classification,
extraction, rewriting, translation of simple words, facts, conversions, lists), plus handwritten examples
(summaries, code explanations, advice). Every answer is computed or checked by hand; nothing is copied from another
dataset.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

rng = random.Random(2024)

VERBS = {"walk": ("walked", "to the park"), "play": ("played", "chess"), "cook": ("cooked", "dinner"),
         "write": ("wrote", "a letter"), "eat": ("ate", "an apple"), "run": ("ran", "to the station"),
         "see": ("saw", "the mountains"), "go": ("went", "to the library"), "read": ("read", "a book"),
         "build": ("built", "a small shed"), "open": ("opened", "the window"), "sing": ("sang", "a song"),
         "drink": ("drank", "some tea"), "take": ("took", "the bus"), "make": ("made", "a cake")}
WORDS = {  # English: (Spanish, French, German)
    "water": ("agua", "eau", "Wasser"), "house": ("casa", "maison", "Haus"), "dog": ("perro", "chien", "Hund"),
    "cat": ("gato", "chat", "Katze"), "book": ("libro", "livre", "Buch"), "sun": ("sol", "soleil", "Sonne"),
    "moon": ("luna", "lune", "Mond"), "bread": ("pan", "pain", "Brot"), "friend": ("amigo", "ami", "Freund"),
    "red": ("rojo", "rouge", "rot"), "green": ("verde", "vert", "grün"), "tree": ("árbol", "arbre", "Baum"),
    "apple": ("manzana", "pomme", "Apfel"), "school": ("escuela", "école", "Schule")}
LANGUAGES = ("Spanish", "French", "German")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Brazil": "Brasília", "Australia": "Canberra",
            "India": "New Delhi", "Mexico": "Mexico City", "Norway": "Oslo", "Peru": "Lima", "Greece": "Athens",
            "Portugal": "Lisbon", "Argentina": "Buenos Aires", "Turkey": "Ankara", "South Korea": "Seoul",
            "Thailand": "Bangkok"}
ANTONYMS = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
            "open": "closed", "full": "empty", "strong": "weak", "young": "old", "high": "low", "rich": "poor",
            "wet": "dry", "loud": "quiet", "hard": "soft"}
PLURALS = {"child": "children", "mouse": "mice", "box": "boxes", "city": "cities", "knife": "knives",
           "tooth": "teeth", "bus": "buses", "woman": "women", "leaf": "leaves", "foot": "feet", "baby": "babies",
           "glass": "glasses"}
FRUITS = "apple banana cherry grape lemon mango orange peach pear plum kiwi melon fig lime".split()
THINGS = ("movie", "meal", "hotel room", "concert", "service", "book", "game", "trip", "lecture", "coffee")
GOOD = ("wonderful", "delightful", "excellent", "fantastic", "lovely", "superb", "charming")
BAD = ("terrible", "awful", "disappointing", "boring", "dreadful", "bland", "rude")
PLACES = ("The bridge", "The museum", "The library", "The stadium", "The railway station", "The theater",
          "The hospital", "The town hall", "The lighthouse", "The school")
NAMES = ("alice", "bruno", "chen", "dara", "emeka", "farah", "goran", "hana", "ivan", "jun", "kofi", "lena")
UNITS = [("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("meters", "centimeters", 100), ("liters", "milliliters", 1000),
         ("days", "hours", 24), ("weeks", "days", 7)]


def ex(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def arithmetic(n: int):
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice("+-*")
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b if op == "-" else a * b
        sign = {"+": "+", "-": "-", "*": "×"}[op]
        q = rng.choice([f"What is {a} {sign} {b}?", f"Calculate {a} {sign} {b}.", f"Compute {a} {sign} {b}."])
        yield ex(q, f"{a} {sign} {b} = {result}.")


def comparisons(n: int):
    for _ in range(n):
        a, b = rng.sample(range(1, 1000), 2)
        yield ex(f"Which number is larger: {a} or {b}?", f"{max(a, b)} is larger.")
        k = rng.randint(1, 500)
        yield ex(f"Is {k} even or odd?", f"{k} is {'even' if k % 2 == 0 else 'odd'}.")


def sorting(n: int):
    for _ in range(n):
        nums = rng.sample(range(1, 100), rng.randint(4, 7))
        yield ex("Sort the numbers in ascending order.", ", ".join(map(str, sorted(nums))), ", ".join(map(str, nums)))
        words = rng.sample(FRUITS, rng.randint(3, 6))
        yield ex("Sort these words alphabetically.", ", ".join(sorted(words)), ", ".join(words))


def sentiment(n: int):
    for _ in range(n):
        good = rng.random() < 0.5
        text = f"The {rng.choice(THINGS)} was {rng.choice(GOOD if good else BAD)}."
        yield ex(rng.choice(["Classify the sentiment of this review as Positive or Negative.",
                             "Is the following sentence positive or negative?"]), "Positive" if good else "Negative",
                 text)


def extraction(n: int):
    for _ in range(n):
        year = rng.randint(1850, 2020)
        yield ex("Extract the year from the sentence.", str(year),
                 f"{rng.choice(PLACES)} opened in {year} after {rng.randint(2, 9)} years of work.")
        email = f"{rng.choice(NAMES)}.{rng.choice(NAMES)}@example.com"
        yield ex("Extract the email address from the text.", email,
                 f"For questions about the schedule, please write to {email} before Friday.")


def rewriting():
    for verb, (past, obj) in VERBS.items():
        subject = rng.choice(["I", "We", "They", "You"])
        yield ex("Rewrite the sentence in the past tense.", f"{subject} {past} {obj}.", f"{subject} {verb} {obj}.")
    for text in ["the meeting starts at nine", "please close the door", "our team won the match",
                 "water boils at one hundred degrees celsius", "the train leaves from platform four"]:
        yield ex("Convert the text to uppercase.", text.upper(), text)
        yield ex("Capitalize the first letter of the sentence and end it with a period.",
                 text[0].upper() + text[1:] + ".", text)


def translation():
    for word, targets in WORDS.items():
        for lang in rng.sample(LANGUAGES, 2):
            yield ex(f"Translate the English word '{word}' into {lang}.", targets[LANGUAGES.index(lang)])


def facts():
    for country, capital in CAPITALS.items():
        yield ex(rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}."]),
                 f"The capital of {country} is {capital}.")
    for word, opposite in ANTONYMS.items():
        yield ex(f"Give the opposite of the word '{word}'.", opposite)
    for word, plural in PLURALS.items():
        yield ex(f"What is the plural of '{word}'?", plural)


def conversions(n: int):
    for _ in range(n):
        big, small, factor = rng.choice(UNITS)
        k = rng.randint(2, 12)
        yield ex(f"Convert {k} {big} to {small}.", f"{k} {big} is {k * factor:,} {small}.")


def counting(n: int):
    for _ in range(n):
        fruits = [f"{'an' if f[0] in 'aeiou' else 'a'} {f}" for f in rng.sample(FRUITS, rng.randint(2, 5))]
        sentence = f"{rng.choice(NAMES).title()} bought {', '.join(fruits[:-1])} and {fruits[-1]} at the market."
        yield ex("How many words are in the following sentence?", str(len(sentence.split())), sentence)
        word = rng.choice(list(WORDS) + FRUITS)
        yield ex(f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters.")
        k, m = rng.randint(2, 12), rng.randint(3, 6)
        yield ex(f"List the first {m} multiples of {k}.", ", ".join(str(k * i) for i in range(1, m + 1)))


CODE = [
    ("def square(x):\n    return x * x", "The function square takes a number x and returns x multiplied by itself."),
    ("for i in range(3):\n    print(i)", "The loop prints the numbers 0, 1 and 2, one per line."),
    ("numbers = [3, 1, 2]\nnumbers.sort()", "It sorts the list numbers in place, so it becomes [1, 2, 3]."),
    ("def is_even(n):\n    return n % 2 == 0", "is_even returns True when n is divisible by 2 and False otherwise."),
    ("total = sum([1, 2, 3, 4])", "It adds up the numbers in the list and stores the result, 10, in total."),
    ("name = input('Name: ')\nprint('Hello, ' + name)", "It asks the user for a name and then greets them by it."),
    ("words = text.split()", "It splits the string text at whitespace and stores the list of words in words."),
    ("x = [n * 2 for n in range(4)]", "The list comprehension builds [0, 2, 4, 6]: each number from 0 to 3, doubled."),
    ("if age >= 18:\n    print('adult')\nelse:\n    print('minor')",
     "It prints 'adult' when age is at least 18 and 'minor' otherwise."),
    ("with open('notes.txt') as f:\n    lines = f.readlines()",
     "It opens notes.txt, reads all of its lines into the list lines, and closes the file automatically."),
    ("def maximum(a, b):\n    return a if a > b else b", "maximum returns the larger of its two arguments."),
    ("s = 'hello'[::-1]", "It reverses the string 'hello', so s becomes 'olleh'."),
    ("count = len(items)", "It stores the number of elements of items in count."),
    ("const double = x => x * 2;", "It defines an arrow function double that returns its argument times two."),
    ("SELECT name FROM users WHERE age > 30;", "The query returns the names of all users older than 30."),
    ("while n > 0:\n    n -= 1", "The loop decreases n by one until it reaches 0."),
]
SUMMARIES = [
    ("The town library will close for two weeks in March while workers replace the roof. Books can still be "
     "returned through the drop box, and the reading room will reopen on April 1.",
     "The library closes for two weeks in March for roof repairs and reopens on April 1."),
    ("Maya practiced the piano every evening for a month. At first the new piece felt impossible, but by the end "
     "of the month she could play it from memory at the school concert.",
     "After a month of daily practice, Maya played a difficult piece from memory at a concert."),
    ("Our team tested three kinds of soil for growing tomatoes. The plants in the soil mixed with compost grew the "
     "tallest and gave the most fruit, while the sandy soil did worst.",
     "Tomatoes grew best in soil mixed with compost and worst in sandy soil."),
    ("The bus company is adding a night route that runs every thirty minutes between the station and the hospital. "
     "The first buses start next Monday.",
     "A new night bus between the station and the hospital, every thirty minutes, starts next Monday."),
    ("Heavy rain flooded several streets near the river on Tuesday. Nobody was hurt, and the water went down by "
     "the evening, but two schools stayed closed for the day.",
     "Tuesday's rain flooded streets near the river and closed two schools, without injuries."),
    ("The recipe needs only four ingredients: flour, water, salt and yeast. Mix them, let the dough rise for two "
     "hours, and bake it for forty minutes.",
     "Simple bread: mix flour, water, salt and yeast, let it rise two hours, bake forty minutes."),
    ("Sam wanted to save money for a bicycle. He put aside part of his pocket money every week and, after eight "
     "months, he had enough to buy it.", "Sam saved part of his pocket money for eight months to buy a bicycle."),
    ("The museum's new exhibition shows tools used by farmers two hundred years ago, from wooden ploughs to hand "
     "mills, and lets visitors try some of them.",
     "A new museum exhibition displays old farming tools that visitors can try."),
]
HANDWRITTEN = [
    ex("List three primary colors of paint.", "Red, yellow and blue."),
    ex("Name the four seasons of the year.", "Spring, summer, autumn and winter."),
    ex("List the first five prime numbers.", "2, 3, 5, 7, 11"),
    ex("List the vowels of the English alphabet.", "a, e, i, o, u"),
    ex("Name the days of the week that start with the letter T.", "Tuesday and Thursday."),
    ex("Give two tips for staying focused while studying.",
       "Put your phone in another room, and work in short blocks with a break after each one."),
    ex("Suggest a name for a small bakery that sells bread and cakes.", "The Morning Loaf."),
    ex("Write a short, polite message declining an invitation to a party.",
       "Thank you so much for the invitation! Unfortunately I can't make it that evening, but I hope you all "
       "have a wonderful time."),
    ex("Explain in one sentence why we see lightning before we hear thunder.",
       "Light travels much faster than sound, so the flash reaches us before the noise does."),
    ex("Give an example of a renewable source of energy.", "Solar power."),
    ex("Write a haiku about the sea.",
       "Grey waves fold and break\nsalt wind combing through the dunes\ngulls hang on the air"),
    ex("Classify each animal as a mammal or a bird.", "Dolphin: mammal. Eagle: bird. Bat: mammal. Penguin: bird.",
       "dolphin, eagle, bat, penguin"),
    ex("Correct the spelling mistakes in the sentence.", "I received the package on Wednesday.",
       "I recieved the pakage on Wensday."),
    ex("Turn the list into a sentence.", "We need eggs, milk, butter and flour.", "eggs; milk; butter; flour"),
    ex("What is the boiling point of water at sea level in degrees Celsius?", "100 degrees Celsius."),
    ex("How many minutes are there in a day?", "There are 1,440 minutes in a day."),
    ex("Which is heavier, a kilogram of feathers or a kilogram of iron?", "Neither: both weigh one kilogram."),
    ex("Rewrite the sentence to be more formal.", "Could you please send me the report by Friday?",
       "Hey, send me the report by Friday, ok?"),
]


def main(out: str = str(Path(__file__).with_name("instructions.jsonl"))) -> None:
    rows = [*arithmetic(40), *comparisons(12), *sorting(10), *sentiment(20), *extraction(10), *rewriting(),
            *translation(), *facts(), *conversions(15), *counting(8),
            *(ex("Explain what this code does.", text, code) for code, text in CODE),
            *(ex("Summarize the text in one sentence.", summary, text) for text, summary in SUMMARIES),
            *HANDWRITTEN]
    unique = list({json.dumps(r, sort_keys=True): r for r in rows}.values())
    rng.shuffle(unique)
    Path(out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in unique), encoding="utf-8")
    print(f"wrote {len(unique)} examples to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
