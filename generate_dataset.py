"""Write a built-in, offline set of true question-answer rows for fine-tuning.

Run:
    .venv/bin/python generate_dataset.py                      # 1200 rows -> data/qa_pairs.jsonl
    .venv/bin/python generate_dataset.py --size 3000 --categories arithmetic,unit_conversion
    .venv/bin/python generate_dataset.py --list-categories    # what each category can give

Each row is {"question", "answer", "key", "category", "fact_id", "fact_group"}:
`answer` is a full sentence, `key` the short part of it that a correct reply must
contain, and `fact_id` names the underlying fact.  Every fact that is included
appears in at least three wordings that share fact_id, answer and key, so a later
step can hold one wording out and test whether the model learned the fact rather
than the sentence.  `fact_group` joins a fact to its restatements the other way
round ("the capital of Ethiopia is Addis Ababa" / "Addis Ababa is the capital of
which country?", symbol / element of a symbol, 7 + 5 / 12 - 5, hot / cold), so
that a fact held out of training is held out with every row that would state it.
Only the standard library is used, so this runs anywhere in a second.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
from collections import Counter, namedtuple

from common import PipelineError, normalize_question, run_main, write_jsonl

# =============================================================================
# Knowledge tables (data only; every entry checked by hand, disputed ones left out)
# =============================================================================

# --- geography ---------------------------------------------------------------
# (country as written mid-sentence, capital, continent or None).  Continent is
# None where the country spans continents or the continent name is debated
# (Russia, Turkey, Egypt; Australia and New Zealand: "Oceania" or "Australia").
# Countries with contested or several capitals (Bolivia, South Africa, the
# Netherlands, Switzerland, Tanzania, Sri Lanka, Malaysia, Israel, ...) and
# capitals with disputed spellings (Kyiv, Ulaanbaatar, Bogota) are left out.
COUNTRIES = [
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("the United Kingdom", "London", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Belgium", "Brussels", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("the Czech Republic", "Prague", "Europe"),
    ("Slovakia", "Bratislava", "Europe"),
    ("Slovenia", "Ljubljana", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Iceland", "Reykjavik", "Europe"),
    ("Estonia", "Tallinn", "Europe"),
    ("Latvia", "Riga", "Europe"),
    ("Lithuania", "Vilnius", "Europe"),
    ("Romania", "Bucharest", "Europe"),
    ("Bulgaria", "Sofia", "Europe"),
    ("Serbia", "Belgrade", "Europe"),
    ("Croatia", "Zagreb", "Europe"),
    ("Russia", "Moscow", None),
    ("Turkey", "Ankara", None),
    ("Egypt", "Cairo", None),
    ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Algeria", "Algiers", "Africa"),
    ("Tunisia", "Tunis", "Africa"),
    ("Uganda", "Kampala", "Africa"),
    ("Zimbabwe", "Harare", "Africa"),
    ("Zambia", "Lusaka", "Africa"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("India", "New Delhi", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("the Philippines", "Manila", "Asia"),
    ("Pakistan", "Islamabad", "Asia"),
    ("Bangladesh", "Dhaka", "Asia"),
    ("Nepal", "Kathmandu", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Saudi Arabia", "Riyadh", "Asia"),
    ("Qatar", "Doha", "Asia"),
    ("Syria", "Damascus", "Asia"),
    ("Jordan", "Amman", "Asia"),
    ("Lebanon", "Beirut", "Asia"),
    ("Afghanistan", "Kabul", "Asia"),
    ("the United States", "Washington, D.C.", "North America"),
    ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"),
    ("Cuba", "Havana", "North America"),
    ("Jamaica", "Kingston", "North America"),
    ("Brazil", "Brasilia", "South America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Peru", "Lima", "South America"),
    ("Venezuela", "Caracas", "South America"),
    ("Ecuador", "Quito", "South America"),
    ("Uruguay", "Montevideo", "South America"),
    ("Australia", "Canberra", None),
    ("New Zealand", "Wellington", None),
]

# (country, currency as named in the answer, key).  Only long-standing
# currencies with one common English name (no yuan/renminbi, ruble/rouble).
CURRENCIES = [
    ("Japan", "Japanese yen", "yen"),
    ("India", "Indian rupee", "rupee"),
    ("Mexico", "Mexican peso", "peso"),
    ("South Korea", "South Korean won", "won"),
    ("Thailand", "Thai baht", "baht"),
    ("the United Kingdom", "pound sterling", "pound"),
    # "US dollar", not "dollar": a key must not match "Canadian dollar".
    ("the United States", "US dollar", "US dollar"),
    ("Canada", "Canadian dollar", "Canadian dollar"),
    ("Australia", "Australian dollar", "Australian dollar"),
    ("Switzerland", "Swiss franc", "franc"),
    ("Brazil", "Brazilian real", "real"),
    ("Sweden", "Swedish krona", "krona"),
    ("Norway", "Norwegian krone", "krone"),
    ("Denmark", "Danish krone", "krone"),
    ("South Africa", "South African rand", "rand"),
    ("Nigeria", "Nigerian naira", "naira"),
    ("France", "euro", "euro"),
    ("Germany", "euro", "euro"),
    ("Italy", "euro", "euro"),
    ("Spain", "euro", "euro"),
    ("Portugal", "euro", "euro"),
    ("Ireland", "euro", "euro"),
    ("Belgium", "euro", "euro"),
    ("Austria", "euro", "euro"),
    ("Greece", "euro", "euro"),
    ("Finland", "euro", "euro"),
    ("the Netherlands", "euro", "euro"),
]

# --- science -----------------------------------------------------------------
# (element, symbol, atomic number).  "Aluminium" is left out: its spelling
# differs between British and American English.
ELEMENTS = [
    ("hydrogen", "H", 1), ("helium", "He", 2), ("lithium", "Li", 3),
    ("beryllium", "Be", 4), ("boron", "B", 5), ("carbon", "C", 6),
    ("nitrogen", "N", 7), ("oxygen", "O", 8), ("fluorine", "F", 9),
    ("neon", "Ne", 10), ("sodium", "Na", 11), ("magnesium", "Mg", 12),
    ("silicon", "Si", 14), ("phosphorus", "P", 15), ("sulfur", "S", 16),
    ("chlorine", "Cl", 17), ("argon", "Ar", 18), ("potassium", "K", 19),
    ("calcium", "Ca", 20), ("titanium", "Ti", 22), ("chromium", "Cr", 24),
    ("manganese", "Mn", 25), ("iron", "Fe", 26), ("cobalt", "Co", 27),
    ("nickel", "Ni", 28), ("copper", "Cu", 29), ("zinc", "Zn", 30),
    ("silver", "Ag", 47), ("tin", "Sn", 50), ("iodine", "I", 53),
    ("tungsten", "W", 74), ("platinum", "Pt", 78), ("gold", "Au", 79),
    ("mercury", "Hg", 80), ("lead", "Pb", 82), ("uranium", "U", 92),
]

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]

# (quantity, SI unit): all SI base or named derived units.
SI_UNITS = [
    ("force", "newton"), ("energy", "joule"), ("power", "watt"),
    ("electric current", "ampere"), ("frequency", "hertz"),
    ("electrical resistance", "ohm"), ("pressure", "pascal"),
    ("electric charge", "coulomb"), ("voltage", "volt"), ("mass", "kilogram"),
    ("length", "metre"), ("time", "second"), ("temperature", "kelvin"),
]

# (slug, answer, key, wordings): hand-written facts, five wordings each.
SCIENCE_FACTS = [
    ("water_formula", "The chemical formula of water is H2O.", "H2O", [
        "What is the chemical formula of water?",
        "Which chemical formula describes water?",
        "How is water written as a chemical formula?",
        "What formula do chemists use for water?",
        "Give the chemical formula of water."]),
    ("salt_formula", "The chemical formula of table salt is NaCl.", "NaCl", [
        "What is the chemical formula of table salt?",
        "Which chemical formula describes table salt?",
        "How is table salt written as a chemical formula?",
        "What formula do chemists use for table salt?",
        "Give the chemical formula of table salt."]),
    ("carbon_dioxide_formula", "The chemical formula of carbon dioxide is CO2.", "CO2", [
        "What is the chemical formula of carbon dioxide?",
        "Which chemical formula describes carbon dioxide?",
        "How is carbon dioxide written as a chemical formula?",
        "What formula do chemists use for carbon dioxide?",
        "Give the chemical formula of carbon dioxide."]),
    ("water_boils_celsius", "At sea level, water boils at 100 degrees Celsius.",
     "100 degrees Celsius", [
        "At what temperature in Celsius does water boil at sea level?",
        "What is the boiling point of water in degrees Celsius?",
        "At how many degrees Celsius does water boil?",
        "How hot must water get to boil at sea level, in Celsius?",
        "What is water's boiling point at sea level in Celsius?"]),
    ("water_boils_fahrenheit", "At sea level, water boils at 212 degrees Fahrenheit.",
     "212 degrees Fahrenheit", [
        "At what temperature in Fahrenheit does water boil at sea level?",
        "What is the boiling point of water in degrees Fahrenheit?",
        "At how many degrees Fahrenheit does water boil?",
        "How hot must water get to boil at sea level, in Fahrenheit?",
        "What is water's boiling point at sea level in Fahrenheit?"]),
    ("water_freezes_celsius", "Water freezes at 0 degrees Celsius.", "0 degrees Celsius", [
        "At what temperature in Celsius does water freeze?",
        "What is the freezing point of water in degrees Celsius?",
        "At how many degrees Celsius does water freeze?",
        "How cold must water get to freeze, in Celsius?",
        "What is water's freezing point in Celsius?"]),
    ("body_temperature", "Normal human body temperature is about 37 degrees Celsius.",
     "37 degrees Celsius", [
        "What is the normal human body temperature in Celsius?",
        "What is a healthy person's body temperature in degrees Celsius?",
        "About how warm is the human body in Celsius?",
        "What temperature is the human body normally, in Celsius?",
        "In degrees Celsius, what is normal body temperature?"]),
    # Not "plants take in carbon dioxide": its key would contain the key "carbon"
    # (the element with symbol C), so a reply "carbon dioxide" would score as "carbon".
    ("plants_release_gas", "Plants give off oxygen into the air.", "oxygen", [
        "Which gas do plants release during photosynthesis?",
        "What gas do plants give off into the air?",
        "Which gas do plant leaves release in sunlight?",
        "What gas is produced by plants as they make food?",
        "Plants give off which gas?"]),
    ("humans_breathe_gas", "Humans need oxygen to breathe and stay alive.", "oxygen", [
        "Which gas do humans need to breathe?",
        "What gas do our bodies need from the air to survive?",
        "Which gas do people breathe in to stay alive?",
        "What gas does the human body need from each breath?",
        "Humans must breathe in which gas to live?"]),
    ("air_mostly_nitrogen", "Nitrogen is the most common gas in the Earth's atmosphere.",
     "Nitrogen", [
        "What is the most common gas in the Earth's atmosphere?",
        "Which gas makes up most of the air?",
        "What gas is most abundant in the atmosphere?",
        "Which gas makes up about 78 percent of the air?",
        "The air we breathe is mostly which gas?"]),
    ("photosynthesis", "Plants make their food from sunlight through photosynthesis.",
     "photosynthesis", [
        "What is the process by which plants make food from sunlight?",
        "What do we call the way plants turn sunlight into food?",
        "Which process lets plants make food using light?",
        "How do plants make their own food from sunlight?",
        "What is the name of the process plants use to make sugar from sunlight?"]),
    ("chlorophyll", "Chlorophyll is the green pigment that plants use to capture light.",
     "Chlorophyll", [
        "What is the green pigment in plants called?",
        "Which pigment makes plant leaves green?",
        "What substance do plants use to capture light for photosynthesis?",
        "Name the green pigment found in plant leaves.",
        "What gives plants their green colour?"]),
    ("mitochondria", "The mitochondria are known as the powerhouse of the cell.",
     "mitochondria", [
        "What is the powerhouse of the cell?",
        "Which part of the cell is called its powerhouse?",
        "Which organelle is known as the powerhouse of the cell?",
        "Which cell structure produces most of the cell's energy?",
        "What part of a cell is nicknamed the powerhouse?"]),
    ("heart_pumps_blood", "The heart pumps blood around the body.", "heart", [
        "Which organ pumps blood around the body?",
        "What organ pumps blood through the human body?",
        "Which organ is responsible for pumping blood?",
        "What pumps blood through your body?",
        "Name the organ that pumps blood."]),
    ("heart_chambers", "The human heart has four chambers.", "four", [
        "How many chambers does the human heart have?",
        "How many chambers are in the human heart?",
        "What is the number of chambers in a human heart?",
        "The human heart is divided into how many chambers?",
        "How many chambers make up the heart of a human?"]),
    ("largest_organ", "The skin is the largest organ of the human body.", "skin", [
        "What is the largest organ of the human body?",
        "Which organ is the biggest in the human body?",
        "What is the human body's largest organ?",
        "Name the largest organ of the body.",
        "Which is the largest organ a human has?"]),
    ("adult_bones", "An adult human body has 206 bones.", "206", [
        "How many bones are in the adult human body?",
        "How many bones does an adult human have?",
        "What is the number of bones in an adult human skeleton?",
        "How many bones make up the adult human skeleton?",
        "An adult person has how many bones?"]),
    ("red_blood_cells", "Red blood cells carry oxygen around the body.", "Red blood cells", [
        "Which blood cells carry oxygen?",
        "What cells in the blood transport oxygen?",
        "Which type of blood cell carries oxygen around the body?",
        "Which cells move oxygen through the body?",
        "Name the blood cells that carry oxygen."]),
    ("vitamin_d", "Sunlight helps the skin make vitamin D.", "vitamin D", [
        "Which vitamin does the body make from sunlight?",
        "What vitamin does sunlight help the skin produce?",
        "Which vitamin is called the sunshine vitamin?",
        "Your skin makes which vitamin when exposed to sunlight?",
        "What vitamin do we get from sunshine?"]),
    ("dna", "DNA stands for deoxyribonucleic acid.", "deoxyribonucleic acid", [
        "What does DNA stand for?",
        "What is the full name of DNA?",
        "What is DNA short for?",
        "DNA is an abbreviation for what?",
        "What is the full form of DNA?"]),
    ("insect_legs", "An insect has six legs.", "six", [
        "How many legs does an insect have?",
        "How many legs do insects have?",
        "What is the number of legs on an insect?",
        "An insect walks on how many legs?",
        "How many legs does an adult insect have?"]),
    ("spider_legs", "A spider has eight legs.", "eight", [
        "How many legs does a spider have?",
        "How many legs do spiders have?",
        "What is the number of legs on a spider?",
        "A spider walks on how many legs?",
        "How many legs does an adult spider have?"]),
    ("largest_animal", "The blue whale is the largest animal on Earth.", "blue whale", [
        "What is the largest animal on Earth?",
        "Which animal is the biggest in the world?",
        "What is the largest animal alive today?",
        "Name the largest animal on Earth.",
        "Which is the biggest animal that lives on our planet?"]),
    ("fastest_land_animal", "The cheetah is the fastest land animal.", "cheetah", [
        "What is the fastest land animal?",
        "Which animal is the fastest runner on land?",
        "Which land animal can run the fastest?",
        "Name the fastest animal on land.",
        "What animal holds the record as the fastest on land?"]),
    ("tallest_animal", "The giraffe is the tallest animal.", "giraffe", [
        "What is the tallest animal?",
        "Which animal is the tallest in the world?",
        "Which living animal stands the tallest?",
        "Name the tallest animal on Earth.",
        "What animal is taller than all others?"]),
    ("hardest_substance", "Diamond is the hardest natural substance.", "Diamond", [
        "What is the hardest natural substance?",
        "Which natural material is the hardest?",
        "What is the hardest naturally occurring mineral?",
        "Name the hardest natural substance on Earth.",
        "Which natural substance is harder than all others?"]),
    ("gravity", "Gravity is the force that pulls objects toward the Earth.", "Gravity", [
        "What force pulls objects toward the Earth?",
        "Which force makes things fall to the ground?",
        "What force keeps us on the ground?",
        "What is the force that makes an apple fall from a tree?",
        "Which force attracts objects toward the Earth?"]),
    ("electron", "The electron is the negatively charged particle in an atom.", "electron", [
        "Which particle in an atom has a negative charge?",
        "What negatively charged particle moves around the nucleus of an atom?",
        "What is the name of the negatively charged particle in an atom?",
        "Which subatomic particle carries a negative charge?",
        "Name the negatively charged particle in an atom."]),
    ("proton", "The proton is the positively charged particle in the nucleus of an atom.",
     "proton", [
        "Which particle in the nucleus of an atom has a positive charge?",
        "What positively charged particle is found in the nucleus of an atom?",
        "What is the name of the positively charged particle in an atom's nucleus?",
        "Which subatomic particle carries a positive charge?",
        "Name the positively charged particle in the nucleus of an atom."]),
    ("neutron", "The neutron is the particle with no electric charge in the nucleus of an atom.",
     "neutron", [
        "Which particle in the nucleus of an atom has no charge?",
        "What neutral particle is found in the nucleus of an atom?",
        "What is the name of the uncharged particle in an atom's nucleus?",
        "Which subatomic particle has no electric charge?",
        "Name the particle in the nucleus of an atom that has no charge."]),
    ("sun_is_star", "The Sun is the star at the centre of our solar system and the nearest "
     "star to Earth.", "Sun", [
        "What star is at the centre of our solar system?",
        "Which star do the planets of our solar system orbit?",
        "What is the name of the star closest to Earth?",
        "Which star is nearest to the Earth?",
        "What is the star in the middle of the solar system?"]),
    ("moon", "The Moon is the Earth's natural satellite.", "Moon", [
        "What is the Earth's natural satellite?",
        "What natural satellite orbits the Earth?",
        "What is the name of the Earth's only natural satellite?",
        "Which body orbits the Earth as its natural satellite?",
        "What is Earth's moon called?"]),
    ("planet_count", "There are eight planets in the solar system.", "eight", [
        "How many planets are in the solar system?",
        "How many planets orbit the Sun?",
        "What is the number of planets in our solar system?",
        "How many planets does our solar system have?",
        "Our solar system contains how many planets?"]),
    ("earth_orbit_days", "The Earth takes about 365 days to orbit the Sun.", "365 days", [
        "How many days does it take the Earth to orbit the Sun?",
        "How long does the Earth take to go around the Sun, in days?",
        "About how many days is one orbit of the Earth around the Sun?",
        "How many days does the Earth need to circle the Sun once?",
        "Roughly how many days long is the Earth's orbit around the Sun?"]),
    ("largest_planet", "Jupiter is the largest planet in the solar system.", "Jupiter", [
        "What is the largest planet in the solar system?",
        "Which planet is the biggest in our solar system?",
        "Which is the largest planet orbiting the Sun?",
        "Name the largest planet in the solar system.",
        "What is the biggest planet?"]),
    ("smallest_planet", "Mercury is the smallest planet in the solar system.", "Mercury", [
        "What is the smallest planet in the solar system?",
        "Which planet is the smallest in our solar system?",
        "Which is the smallest planet orbiting the Sun?",
        "Name the smallest planet in the solar system.",
        "What is the tiniest planet?"]),
    ("hottest_planet", "Venus is the hottest planet in the solar system.", "Venus", [
        "What is the hottest planet in the solar system?",
        "Which planet is the hottest?",
        "Which planet has the highest surface temperature?",
        "Name the hottest planet in our solar system.",
        "Which planet in the solar system is hottest?"]),
    ("red_planet", "Mars is known as the Red Planet.", "Mars", [
        "Which planet is known as the Red Planet?",
        "What planet is called the Red Planet?",
        "Which planet is nicknamed the Red Planet?",
        "Name the planet known as the Red Planet.",
        "What is the Red Planet?"]),
    ("ringed_planet", "Saturn is the planet best known for its rings.", "Saturn", [
        "Which planet is best known for its rings?",
        "Which planet is famous for its rings?",
        "What planet has the most famous rings?",
        "Name the planet best known for its ring system.",
        "Which planet is known for its bright, wide rings?"]),
]

# --- language ----------------------------------------------------------------
# (word, plural): irregular or spelling-changing plurals with one standard form.
PLURALS = [
    ("child", "children"), ("mouse", "mice"), ("man", "men"), ("woman", "women"),
    ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("sheep", "sheep"), ("deer", "deer"), ("louse", "lice"),
    ("leaf", "leaves"), ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"),
    ("half", "halves"), ("life", "lives"), ("loaf", "loaves"), ("shelf", "shelves"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("city", "cities"), ("baby", "babies"), ("lady", "ladies"), ("story", "stories"),
    ("box", "boxes"), ("fox", "foxes"), ("church", "churches"), ("dish", "dishes"),
    ("crisis", "crises"), ("thesis", "theses"), ("analysis", "analyses"),
    ("phenomenon", "phenomena"), ("criterion", "criteria"),
]

# (word, opposite): one direction per row; a word appears on the left only when
# its opposite is unambiguous ("right" could be "left" or "wrong", so it is not).
OPPOSITES = [
    ("hot", "cold"), ("cold", "hot"), ("up", "down"), ("down", "up"),
    ("left", "right"), ("day", "night"), ("night", "day"), ("yes", "no"),
    ("no", "yes"), ("true", "false"), ("false", "true"), ("north", "south"),
    ("south", "north"), ("east", "west"), ("west", "east"), ("push", "pull"),
    ("pull", "push"), ("wet", "dry"), ("dry", "wet"), ("empty", "full"),
    ("full", "empty"), ("above", "below"), ("below", "above"), ("before", "after"),
    ("after", "before"), ("always", "never"), ("never", "always"),
    ("inside", "outside"), ("outside", "inside"), ("win", "lose"), ("buy", "sell"),
    ("sell", "buy"), ("early", "late"), ("late", "early"), ("top", "bottom"),
    ("bottom", "top"), ("alive", "dead"), ("dead", "alive"),
    ("maximum", "minimum"), ("minimum", "maximum"), ("plus", "minus"),
    ("minus", "plus"), ("entrance", "exit"), ("exit", "entrance"),
    ("asleep", "awake"), ("awake", "asleep"), ("sunrise", "sunset"),
    ("sunset", "sunrise"), ("rich", "poor"), ("poor", "rich"), ("strong", "weak"),
    ("weak", "strong"), ("good", "bad"), ("bad", "good"), ("first", "last"),
    ("last", "first"), ("fast", "slow"), ("slow", "fast"), ("male", "female"),
    ("female", "male"), ("boy", "girl"), ("girl", "boy"), ("clean", "dirty"),
    ("dirty", "clean"), ("safe", "dangerous"), ("dangerous", "safe"),
    ("cheap", "expensive"), ("expensive", "cheap"), ("friend", "enemy"),
    ("enemy", "friend"), ("love", "hate"), ("hate", "love"), ("war", "peace"),
    ("peace", "war"), ("remember", "forget"), ("forget", "remember"),
    ("increase", "decrease"), ("decrease", "increase"), ("import", "export"),
    ("export", "import"), ("positive", "negative"), ("negative", "positive"),
    ("success", "failure"), ("failure", "success"), ("summer", "winter"),
    ("winter", "summer"), ("possible", "impossible"), ("impossible", "possible"),
    ("visible", "invisible"), ("invisible", "visible"), ("legal", "illegal"),
    ("illegal", "legal"), ("thick", "thin"), ("long", "short"), ("tall", "short"),
    ("heavy", "light"), ("dark", "light"), ("young", "old"), ("new", "old"),
]

# (verb, simple past): irregular verbs with a single standard past form
# (no dream/dreamt, learn/learnt, hang/hanged).
PAST_TENSES = [
    ("go", "went"), ("eat", "ate"), ("see", "saw"), ("run", "ran"), ("write", "wrote"),
    ("take", "took"), ("give", "gave"), ("swim", "swam"), ("sing", "sang"),
    ("drink", "drank"), ("begin", "began"), ("fly", "flew"), ("drive", "drove"),
    ("speak", "spoke"), ("break", "broke"), ("choose", "chose"), ("know", "knew"),
    ("throw", "threw"), ("grow", "grew"), ("draw", "drew"), ("buy", "bought"),
    ("bring", "brought"), ("think", "thought"), ("teach", "taught"), ("catch", "caught"),
    ("fight", "fought"), ("seek", "sought"), ("sleep", "slept"), ("keep", "kept"),
    ("feel", "felt"), ("leave", "left"), ("send", "sent"), ("spend", "spent"),
    ("build", "built"), ("sit", "sat"), ("stand", "stood"), ("understand", "understood"),
    ("tell", "told"), ("sell", "sold"), ("find", "found"), ("win", "won"),
    ("hold", "held"), ("make", "made"), ("say", "said"), ("pay", "paid"),
    ("meet", "met"), ("lose", "lost"), ("forget", "forgot"), ("ride", "rode"),
    ("wake", "woke"), ("wear", "wore"), ("hide", "hid"), ("bite", "bit"),
    ("fall", "fell"), ("freeze", "froze"), ("steal", "stole"), ("shake", "shook"),
    ("forgive", "forgave"), ("come", "came"), ("become", "became"), ("do", "did"),
    ("have", "had"), ("get", "got"),
]

# --- small talk ----------------------------------------------------------------
# (slug, answer, key, wordings): hand-written; the key is the salient phrase.
SMALL_TALK = [
    ("what_is_ai", "AI, or artificial intelligence, is the field of building computer "
     "systems that do tasks that usually need human intelligence, such as understanding "
     "language.", "artificial intelligence", [
        "What is AI?", "What does AI mean?", "What does AI stand for?",
        "Can you explain what AI is?", "What is artificial intelligence?"]),
    ("machine_learning", "Machine learning is a branch of artificial intelligence in which "
     "computers learn from data instead of following hand-written rules.", "learn from data", [
        "What is machine learning?", "Can you explain machine learning?",
        "What does machine learning mean?", "How would you define machine learning?",
        "What is ML?"]),
    ("deep_learning", "Deep learning is a kind of machine learning that uses neural networks "
     "with many layers.", "neural networks", [
        "What is deep learning?", "Can you explain deep learning?",
        "What does deep learning mean?", "How would you define deep learning?",
        "What is meant by deep learning?"]),
    ("neural_network", "A neural network is a computer model made of layers of connected "
     "units, loosely inspired by the neurons in a brain.", "connected units", [
        "What is a neural network?", "What are neural networks?",
        "Can you explain what a neural network is?",
        "How would you describe a neural network?",
        "What does the term neural network mean?"]),
    ("language_model", "A language model is an AI system trained on large amounts of text "
     "to predict the next word.", "predict the next word", [
        "What is a language model?", "What are language models?",
        "Can you explain what a language model is?", "What does a language model do?",
        "How would you define a language model?"]),
    ("fine_tuning", "Fine-tuning means training a pre-trained model a little more on a "
     "smaller dataset for a specific task.", "pre-trained model", [
        "What is fine-tuning?", "What does fine-tuning a model mean?",
        "Can you explain fine-tuning?", "How would you define fine-tuning?",
        "What is meant by fine-tuning a model?"]),
    ("training_data", "Training data is the set of examples that a machine learning model "
     "learns from.", "examples", [
        "What is training data?", "What does training data mean?",
        "Can you explain training data?", "How would you define training data?",
        "What is meant by training data?"]),
    ("overfitting", "Overfitting is when a model fits its training data too closely and "
     "does poorly on new data.", "new data", [
        "What is overfitting?", "What does overfitting mean?",
        "Can you explain overfitting?", "How would you define overfitting?",
        "What is meant by overfitting in machine learning?"]),
    ("chatbot", "A chatbot is a computer program that holds conversations with people in "
     "text or speech.", "conversations", [
        "What is a chatbot?", "What are chatbots?", "Can you explain what a chatbot is?",
        "How would you define a chatbot?", "What does a chatbot do?"]),
    ("algorithm", "An algorithm is a step-by-step set of instructions for solving a "
     "problem.", "step-by-step", [
        "What is an algorithm?", "What does algorithm mean?",
        "Can you explain what an algorithm is?", "How would you define an algorithm?",
        "What is meant by an algorithm?"]),
    ("computer", "A computer is a machine that processes information by following "
     "instructions called programs.", "processes information", [
        "What is a computer?", "What does a computer do?",
        "Can you explain what a computer is?", "How would you define a computer?",
        "What is meant by a computer?"]),
    ("internet", "The internet is a global network that connects computers around the "
     "world.", "global network", [
        "What is the internet?", "Can you explain what the internet is?",
        "How would you describe the internet?", "What does the internet do?",
        "What is meant by the internet?"]),
    ("robot", "A robot is a machine that can carry out tasks automatically, often "
     "controlled by a computer.", "tasks automatically", [
        "What is a robot?", "What are robots?", "Can you explain what a robot is?",
        "How would you define a robot?", "What does the word robot mean?"]),
    ("python", "Python is a popular programming language known for its readable code.",
     "programming language", [
        "What is Python?", "Tell me about Python.", "Can you explain what Python is?",
        "How would you describe Python?", "What kind of thing is Python in computing?"]),
    ("cpu", "CPU stands for central processing unit.", "central processing unit", [
        "What does CPU stand for?", "What is a CPU?", "What is the meaning of CPU?",
        "What is the full form of CPU?", "CPU is short for what?"]),
    ("gpu", "GPU stands for graphics processing unit.", "graphics processing unit", [
        "What does GPU stand for?", "What is a GPU?", "What is the meaning of GPU?",
        "What is the full form of GPU?", "GPU is short for what?"]),
    ("how_are_you", "I am doing well, thank you for asking. How can I help you?",
     "doing well", [
        "How are you?", "How are you doing?", "How are you today?",
        "How is it going?", "How have you been?"]),
    ("who_are_you", "I am an AI assistant, a computer program that answers questions and "
     "helps with tasks.", "AI assistant", [
        "Who are you?", "What are you?", "Can you tell me who you are?",
        "Please introduce yourself.", "Tell me about yourself."]),
    ("your_name", "I do not have a personal name; you can simply call me your assistant.",
     "personal name", [
        "What is your name?", "What's your name?", "Do you have a name?",
        "What should I call you?", "What are you called?"]),
    ("are_you_human", "No, I am not a human; I am an AI program.", "not a human", [
        "Are you a human?", "Are you a real person?", "Am I talking to a human?",
        "Is this a person or a computer?", "Is there a person typing these answers?"]),
    ("feelings", "No, I do not have feelings; I am a computer program that processes text.",
     "do not have feelings", [
        "Do you have feelings?", "Can you feel emotions?", "Do you have emotions?",
        "Are you able to feel happy or sad?", "Do you ever get sad?"]),
    ("what_can_you_do", "I can answer questions, explain ideas and help with writing and "
     "calculations.", "answer questions", [
        "What can you do?", "How can you help me?", "What are you able to do?",
        "What kinds of things can you help with?", "What are your abilities?"]),
    ("can_you_help", "Yes, of course. Tell me what you need help with.", "of course", [
        "Can you help me?", "Could you help me with something?", "I need some help.",
        "Will you help me?", "Can I ask you for help?"]),
    ("greeting", "Hello! How can I help you today?", "Hello", [
        "Hello!", "Hi!", "Hi there!", "Hello there!", "Good morning!"]),
    ("nice_to_meet_you", "Nice to meet you too!", "Nice to meet you", [
        "Nice to meet you.", "It is nice to meet you.", "Pleased to meet you.",
        "Glad to meet you!", "It's a pleasure to meet you."]),
    ("thanks", "You are welcome! I am glad I could help.", "welcome", [
        "Thank you!", "Thanks!", "Thanks a lot!", "Thank you for your help.",
        "Thanks for helping me."]),
    ("goodbye", "Goodbye! Have a great day.", "Goodbye", [
        "Goodbye!", "Bye!", "See you later!", "I have to go now, bye.",
        "Talk to you later, goodbye."]),
    ("joke", "Why did the scarecrow win an award? Because he was outstanding in his field.",
     "outstanding in his field", [
        "Tell me a joke.", "Do you know a good joke?", "Can you tell me something funny?",
        "Make me laugh.", "Say something funny."]),
    ("weather", "I cannot check the current weather; a weather website or app can tell you.",
     "cannot check the current weather", [
        "What is the weather like today?", "Will it rain today?",
        "What's the weather forecast?", "Is it sunny outside?",
        "How is the weather right now?"]),
    ("time", "I cannot see a clock, so please check the time on your device.", "clock", [
        "What time is it?", "Can you tell me the time?", "What is the time now?",
        "Do you know what time it is?", "What's the current time?"]),
]

# --- computed facts: ranges and conversion factors -----------------------------
ADD_OPERANDS = range(1, 21)        # a + b for 1 <= a <= b <= 20
SUBTRACT_OPERANDS = range(1, 21)   # a - b for 1 <= b <= a <= 20: never negative
MULTIPLY_OPERANDS = range(1, 13)   # the times tables, a * b for 1 <= a <= b <= 12
CONVERSION_AMOUNTS = range(1, 21)  # whole amounts, so every answer is an exact integer

# (from unit singular, from unit plural, to unit plural, factor): exact by definition.
CONVERSIONS = [
    ("kilometre", "kilometres", "metres", 1000),
    ("metre", "metres", "centimetres", 100),
    ("metre", "metres", "millimetres", 1000),
    ("centimetre", "centimetres", "millimetres", 10),
    ("kilogram", "kilograms", "grams", 1000),
    ("tonne", "tonnes", "kilograms", 1000),
    ("litre", "litres", "millilitres", 1000),
    ("hour", "hours", "minutes", 60),
    ("hour", "hours", "seconds", 3600),
    ("minute", "minutes", "seconds", 60),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("year", "years", "months", 12),
]

# =============================================================================
# Question templates (five or more per fact type; see MIN_POOL_WORDINGS)
# =============================================================================

TEMPLATES = {
    "capital": [
        "What is the capital of {country}?", "Which city is the capital of {country}?",
        "Name the capital city of {country}.", "What city serves as the capital of {country}?",
        "What is the capital city of {country}?", "Tell me the capital of {country}."],
    "capital_of": [
        "{capital} is the capital of which country?",
        "Which country has {capital} as its capital?",
        "Of which country is {capital} the capital?",
        "{capital} is the capital city of which country?",
        "Which country's capital is {capital}?"],
    "continent": [
        "On which continent is {country}?", "Which continent is {country} in?",
        "{country} is located on which continent?",
        "On which continent is {country} located?",
        "What continent is {country} part of?"],
    "currency": [
        "What is the currency of {country}?", "Which currency is used in {country}?",
        "What currency does {country} use?", "What is the official currency of {country}?",
        "What money do people use in {country}?"],
    "symbol": [
        "What is the chemical symbol for {element}?",
        "Which symbol represents {element} on the periodic table?",
        "What is the symbol for the element {element}?",
        "How is {element} written as a chemical symbol?",
        "Give the chemical symbol of {element}."],
    "element_of_symbol": [
        "Which element has the chemical symbol {symbol}?",
        "What element does the symbol {symbol} stand for?",
        "Which chemical element is represented by {symbol}?",
        "The symbol {symbol} stands for which element?",
        "Name the element whose chemical symbol is {symbol}."],
    "atomic_number": [
        "What is the atomic number of {element}?",
        "Which atomic number does {element} have?",
        "How many protons does an atom of {element} have?",
        "What number is {element} on the periodic table?",
        "Give the atomic number of {element}."],
    "planet_order": [
        "Which planet is {ordinal} from the Sun?",
        "What is the {ordinal} planet from the Sun?",
        "Name the {ordinal} planet from the Sun.",
        "Counting outward from the Sun, which planet is {ordinal}?",
        "Which planet comes {ordinal} in order from the Sun?"],
    "si_unit": [
        "What is the SI unit of {quantity}?",
        "Which SI unit is used to measure {quantity}?",
        "In what SI unit is {quantity} measured?",
        "Name the SI unit of {quantity}.",
        "What unit does the SI system use for {quantity}?"],
    # Symbol-only wordings ("3 + 4") use a different opening verb per operation:
    # normalisation strips + - *, so "What is 4 + 3" and "What is 4 - 3" would collide.
    "add": [
        "What is {x} plus {y}?", "What is {x} + {y}?", "How much is {x} plus {y}?",
        "What is the sum of {x} and {y}?", "Add {x} and {y}.",
        "What do you get if you add {x} to {y}?"],
    "subtract": [
        "What is {a} minus {b}?", "Compute {a} - {b}.", "How much is {a} minus {b}?",
        "Subtract {b} from {a}.", "What do you get if you take {b} away from {a}?"],
    "multiply": [
        "What is {x} times {y}?", "What is {x} multiplied by {y}?", "Calculate {x} * {y}.",
        "What is the product of {x} and {y}?", "Multiply {x} by {y}.",
        "How much is {x} times {y}?"],
    "conversion": [
        "How many {to} are in {n} {unit}?", "How many {to} are there in {n} {unit}?",
        "Convert {n} {unit} to {to}.", "{n} {unit} equals how many {to}?",
        "What is {n} {unit} in {to}?", "Express {n} {unit} in {to}."],
    "plural": [
        "What is the plural of {word}?", "What is the plural form of {word}?",
        "How do you say {word} in the plural?", "Give the plural of the word {word}.",
        "One {word}, two what?"],
    "opposite": [
        "What is the opposite of {word}?", "What word means the opposite of {word}?",
        "What is the antonym of {word}?", "Give the opposite of the word {word}.",
        "Which word is opposite in meaning to {word}?"],
    "past_tense": [
        "What is the past tense of {word}?", "What is the simple past of the verb {word}?",
        "How do you write {word} in the past tense?",
        "Give the past tense of the word {word}.",
        "Which word is the past tense of {word}?"],
}

# =============================================================================
# Fact pool
# =============================================================================

CATEGORIES = ("geography", "science", "arithmetic", "unit_conversion", "small_talk",
              "language")

# A fact in the output needs 3 wordings (2 to train on, 1 to hold out).  Every fact
# in the pool has at least 5 so that any share of rows >= 3 can be met: a share of
# 3f + 1 or 3f + 2 rows puts the extra rows on facts as 4th and 5th wordings.
MIN_ROW_WORDINGS = 3
MIN_POOL_WORDINGS = 5

# group: the fact_group, shared with the fact's restatements (see the module docstring).
Fact = namedtuple("Fact", "fact_id category answer key questions group")


def capitalise(text: str) -> str:
    """Upper-case the first letter only ("the United Kingdom ..." -> "The United ...")."""
    return text[:1].upper() + text[1:]


def slug(name: str) -> str:
    """A fact_id part: lower case, no leading "the", runs of other characters as "_"."""
    name = name.lower().removeprefix("the ")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def templated(fact_id: str, kind: str, answer: str, key: str, group: str | None = None,
              **fields) -> Fact:
    """One fact whose wordings are TEMPLATES[kind] filled in; group is fact_id unless given."""
    category = fact_id.split("/", 1)[0]
    questions = tuple(capitalise(t.format(**fields)) for t in TEMPLATES[kind])
    return Fact(fact_id, category, capitalise(answer), key, questions, group or fact_id)


def written(fact_id: str, answer: str, key: str, questions) -> Fact:
    """One hand-written fact; it has no restatement, so it is its own group."""
    return Fact(fact_id, fact_id.split("/", 1)[0], answer, key, tuple(questions), fact_id)


def geography_facts() -> list[Fact]:
    """Capitals (both ways round), continents and currencies; one group per country."""
    facts = []
    for country, capital, continent in COUNTRIES:
        name = country.removeprefix("the ")
        group = f"geography/{slug(country)}"
        facts.append(templated(f"geography/capital/{slug(country)}", "capital",
                               f"The capital of {country} is {capital}.", capital,
                               group, country=country))
        # "Mexico City is the capital of which country?" would hold its own answer.
        if not re.search(rf"\b{re.escape(name)}\b", capital):
            facts.append(templated(f"geography/capital_of/{slug(capital)}", "capital_of",
                                   f"{capital} is the capital of {country}.", name,
                                   group, capital=capital))
        if continent:
            facts.append(templated(f"geography/continent/{slug(country)}", "continent",
                                   f"{country} is in {continent}.", continent,
                                   group, country=country))
    for country, currency, key in CURRENCIES:
        facts.append(templated(f"geography/currency/{slug(country)}", "currency",
                               f"The currency of {country} is the {currency}.", key,
                               f"geography/{slug(country)}", country=country))
    return facts


def science_facts() -> list[Fact]:
    """Element symbols and numbers, planet order, SI units and hand-written facts."""
    facts = []
    for element, symbol, number in ELEMENTS:
        # Symbol and element-of-symbol state one fact both ways round: one group per
        # element, its atomic number included.
        group = f"science/element/{element}"
        facts.append(templated(f"science/symbol/{element}", "symbol",
                               f"The chemical symbol for {element} is {symbol}.", symbol,
                               group, element=element))
        facts.append(templated(f"science/element_of_symbol/{slug(symbol)}",
                               "element_of_symbol",
                               f"{symbol} is the chemical symbol for {element}.", element,
                               group, symbol=symbol))
        facts.append(templated(f"science/atomic_number/{element}", "atomic_number",
                               f"The atomic number of {element} is {number}.", str(number),
                               group, element=element))
    for planet, ordinal in zip(PLANETS, ORDINALS):
        facts.append(templated(f"science/planet_order/{ordinal}", "planet_order",
                               f"{planet} is the {ordinal} planet from the Sun.", planet,
                               ordinal=ordinal))
    for quantity, unit in SI_UNITS:
        facts.append(templated(f"science/si_unit/{slug(quantity)}", "si_unit",
                               f"The SI unit of {quantity} is the {unit}.", unit,
                               quantity=quantity))
    facts.extend(written(f"science/fact/{name}", answer, key, questions)
                 for name, answer, key, questions in SCIENCE_FACTS)
    return facts


def arithmetic_facts() -> list[Fact]:
    """Sums, differences and products of small integers, computed here."""
    facts = []
    for a in ADD_OPERANDS:
        for b in ADD_OPERANDS:
            if a <= b:  # 3 + 4 and 4 + 3 are one fact
                x, y = commuted(a, b)
                facts.append(templated(f"arithmetic/add/{a}_{b}", "add",
                                       f"{x} plus {y} equals {a + b}.", str(a + b),
                                       family(a, b), x=x, y=y))
    for a in SUBTRACT_OPERANDS:
        for b in SUBTRACT_OPERANDS:
            if b <= a:
                facts.append(templated(f"arithmetic/subtract/{a}_{b}", "subtract",
                                       f"{a} minus {b} equals {a - b}.", str(a - b),
                                       family(b, a - b), a=a, b=b))
    for a in MULTIPLY_OPERANDS:
        for b in MULTIPLY_OPERANDS:
            if a <= b:
                x, y = commuted(a, b)
                facts.append(templated(f"arithmetic/multiply/{a}_{b}", "multiply",
                                       f"{x} times {y} equals {a * b}.", str(a * b), x=x, y=y))
    return facts


def family(x: int, y: int) -> str:
    """Group of x + y = s with s - x = y and s - y = x: 7 + 5 = 12 and 12 - 5 = 7 are one fact."""
    if min(x, y) < 1:  # s - s = 0 has no sum among the addition facts: its own group
        return f"arithmetic/subtract/{x + y}_{x + y}"
    return f"arithmetic/family/{min(x, y)}_{max(x, y)}"


def commuted(a: int, b: int) -> tuple[int, int]:
    """Operand order shown for a <= b: mixed by parity so neither order always comes first."""
    return (a, b) if (a + b) % 2 == 0 else (b, a)


def conversion_facts() -> list[Fact]:
    """Whole-number unit conversions, computed here from exact factors."""
    facts = []
    for singular, plural, to, factor in CONVERSIONS:
        for n in CONVERSION_AMOUNTS:
            unit = singular if n == 1 else plural
            facts.append(templated(f"unit_conversion/{singular}_to_{to}/{n}", "conversion",
                                   f"{n} {unit} is {n * factor} {to}.", str(n * factor),
                                   n=n, unit=unit, to=to))
    return facts


def small_talk_facts() -> list[Fact]:
    """The hand-written conversational answers."""
    return [written(f"small_talk/{name}", answer, key, questions)
            for name, answer, key, questions in SMALL_TALK]


def language_facts() -> list[Fact]:
    """Plurals, opposites and past tenses."""
    facts = []
    for word, plural in PLURALS:
        facts.append(templated(f"language/plural/{word}", "plural",
                               f"The plural of {word} is {plural}.", plural, word=word))
    for word, opposite in OPPOSITES:
        # "hot -> cold" and "cold -> hot" state one pair: one group, named by the pair.
        pair = "_".join(sorted((word, opposite)))
        facts.append(templated(f"language/opposite/{word}", "opposite",
                               f"The opposite of {word} is {opposite}.", opposite,
                               f"language/opposite/{pair}", word=word))
    for verb, past in PAST_TENSES:
        facts.append(templated(f"language/past_tense/{verb}", "past_tense",
                               f"The past tense of {verb} is {past}.", past, word=verb))
    return facts


BUILDERS = {
    "geography": geography_facts, "science": science_facts,
    "arithmetic": arithmetic_facts, "unit_conversion": conversion_facts,
    "small_talk": small_talk_facts, "language": language_facts,
}


@functools.lru_cache(maxsize=1)
def fact_pool() -> dict[str, tuple[Fact, ...]]:
    """Every fact of every category, checked once: the tables are data and can have typos."""
    pool = {category: tuple(BUILDERS[category]()) for category in CATEGORIES}
    facts = [fact for category in CATEGORIES for fact in pool[category]]
    ids = Counter(fact.fact_id for fact in facts)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    for fact in facts:
        assert fact.key in fact.answer, fact
        assert len(fact.questions) >= MIN_POOL_WORDINGS, fact
        assert fact.group.startswith(fact.category + "/"), fact
    for category in CATEGORIES:
        assert not key_clashes(pool[category]), key_clashes(pool[category])[:5]
    # Checking the whole pool makes every subset the generator can pick unique too.
    assert_unique_questions(q for fact in facts for q in fact.questions)
    return pool


def key_clashes(facts) -> list[tuple[str, str]]:
    """(key, other key) pairs where one key is whole words inside a different one ("dollar")."""
    keys = sorted({fact.key.lower() for fact in facts})
    return [(key, other) for key in keys for other in keys
            if key != other and re.search(rf"(?<!\w){re.escape(key)}(?!\w)", other)]


def assert_unique_questions(questions) -> None:
    """Fail if two questions are the same after normalisation (a held-out wording would leak)."""
    seen = Counter(normalize_question(q) for q in questions)
    repeated = sorted(q for q, n in seen.items() if n > 1)
    assert not repeated, f"repeated questions: {repeated[:5]}"


def row_capacity(category: str) -> int:
    """Most rows a category can give: every wording of every fact."""
    return sum(len(fact.questions) for fact in fact_pool()[category])


# =============================================================================
# Picking rows
# =============================================================================


def split_rows(total: int, capacities: dict[str, int]) -> dict[str, int]:
    """Share total rows across categories as evenly as capacities allow; each share 0 or >= 3."""
    # Too few rows for 3 per category: the first categories in order get them.
    names = list(capacities)[: total // MIN_ROW_WORDINGS]
    shares = dict.fromkeys(capacities, 0)
    left = total
    # Smallest capacity first, so what it cannot take spreads over the rest.
    for position, name in enumerate(sorted(names, key=lambda n: capacities[n])):
        waiting = len(names) - position
        shares[name] = min(capacities[name], -(-left // waiting))
        left -= shares[name]
    assert left == 0, (total, capacities)
    return shares


def pick_rows(facts: tuple[Fact, ...], count: int, rng: random.Random) -> list[dict]:
    """count rows from facts: as many facts as possible at 3 wordings, extras as 4th, 5th..."""
    chosen = rng.sample(facts, min(len(facts), count // MIN_ROW_WORDINGS))
    wordings = [MIN_ROW_WORDINGS] * len(chosen)
    extra = count - MIN_ROW_WORDINGS * len(chosen)
    # Hand out extra wordings round-robin so no fact gets many more than another.
    while extra:
        before = extra
        for index, fact in enumerate(chosen):
            if extra and wordings[index] < len(fact.questions):
                wordings[index] += 1
                extra -= 1
        assert extra < before, "not enough wordings; the size check should have caught this"
    return [{"question": question, "answer": fact.answer, "key": fact.key,
             "category": fact.category, "fact_id": fact.fact_id, "fact_group": fact.group}
            for fact, n in zip(chosen, wordings)
            for question in rng.sample(fact.questions, n)]


def check_rows(rows: list[dict]) -> None:
    """Assert the guarantees later steps rely on, on the rows actually written."""
    assert_unique_questions(row["question"] for row in rows)
    per_fact = {}
    for row in rows:
        assert row["key"] in row["answer"], row
        per_fact.setdefault(row["fact_id"], []).append(row)
    for fact_rows in per_fact.values():
        assert len(fact_rows) >= MIN_ROW_WORDINGS, fact_rows[0]["fact_id"]
        assert len({(r["answer"], r["key"], r["category"], r["fact_group"])
                    for r in fact_rows}) == 1


def print_summary(rows: list[dict], path: str) -> None:
    """Say what was written, with rows, facts and fact groups per category."""
    facts = {row["fact_id"]: row["category"] for row in rows}
    groups = {row["fact_group"]: row["category"] for row in rows}
    row_counts = Counter(row["category"] for row in rows)
    fact_counts, group_counts = Counter(facts.values()), Counter(groups.values())
    print(f"wrote {len(rows)} rows ({len(facts)} facts in {len(groups)} fact groups) to {path}")
    for category in CATEGORIES:
        if row_counts[category]:
            print(f"  {category:<16} {row_counts[category]:>5} rows  "
                  f"{fact_counts[category]:>4} facts  {group_counts[category]:>4} groups")


def print_capacities() -> None:
    """List each category with how many facts and rows it can give."""
    print(f"{'category':<16} {'facts':>6} {'max rows':>9}")
    for category in CATEGORIES:
        print(f"{category:<16} {len(fact_pool()[category]):>6} {row_capacity(category):>9}")


# =============================================================================
# Command line
# =============================================================================


def parse_args(argv=None) -> argparse.Namespace:
    """Read and check the command line; impossible requests exit with status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/qa_pairs.jsonl",
                        help="where to write the rows (default data/qa_pairs.jsonl: "
                             "where the next pipeline step reads from)")
    parser.add_argument("--size", type=int, default=1200,
                        help="number of question-answer rows (default 1200: about 400 "
                             "facts, enough for a small model to learn from while a "
                             "fine-tune stays short)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="comma-separated categories to include (default: all of "
                             f"{', '.join(CATEGORIES)}, for a broad mix of knowledge)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seed for which facts and wordings are picked and their "
                             "order (default 42: fixed, so reruns give the same file "
                             "byte for byte)")
    parser.add_argument("--list-categories", action="store_true",
                        help="print each category with its number of facts and most rows, "
                             "then exit (default off: a plain run writes the dataset)")
    args = parser.parse_args(argv)

    requested = [name.strip() for name in args.categories.split(",") if name.strip()]
    unknown = [name for name in requested if name not in CATEGORIES]
    if unknown or not requested:
        parser.error(f"unknown category {', '.join(unknown) or '(none given)'}; "
                     f"valid: {', '.join(CATEGORIES)}")
    # Canonical order, not the order typed, so the output depends only on the set.
    args.categories = [name for name in CATEGORIES if name in requested]
    if not args.list_categories:
        maximum = sum(row_capacity(name) for name in args.categories)
        if not MIN_ROW_WORDINGS <= args.size <= maximum:
            parser.error(f"--size {args.size} is out of range: categories "
                         f"{', '.join(args.categories)} give {MIN_ROW_WORDINGS} to "
                         f"{maximum} rows (maximum {maximum})")
    return args


def main(args: argparse.Namespace) -> None:
    """Build the fact pool, pick rows, check them and write them."""
    # --list-categories only reports what is available.
    if args.list_categories:
        print_capacities()
        return

    # Share the rows across categories, then pick facts and wordings in each.
    # One Random(seed) drawn from in a fixed order makes the file reproducible.
    rng = random.Random(args.seed)
    shares = split_rows(args.size, {name: row_capacity(name) for name in args.categories})
    rows = []
    for category in args.categories:
        rows.extend(pick_rows(fact_pool()[category], shares[category], rng))
    # Shuffle so categories and wordings of one fact are not bunched together.
    rng.shuffle(rows)

    # Check before writing, so a broken table never reaches the training step.
    if len(rows) != args.size:
        raise PipelineError(f"picked {len(rows)} rows, expected {args.size}")
    check_rows(rows)

    # Write atomically and report.
    write_jsonl(args.output, rows)
    print_summary(rows, args.output)


if __name__ == "__main__":
    run_main(main, parse_args())
