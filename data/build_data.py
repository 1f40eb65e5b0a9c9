#!/usr/bin/env python3
"""Regenerate the small chat dataset bundled with hpd-tools.

Every instruction/response pair below is original text written for this
project and is licensed with it (Apache-2.0).

Running the script writes, deterministically:

    data/instructions/train.jsonl
    data/instructions/heldout.jsonl

Records are sorted by id. A record goes to the held-out split when the number
in its id is a multiple of HELDOUT_EVERY (expl-006, expl-012, ...), otherwise
to train. Each output line is one JSON object with the keys, in order:
id, kind, messages (a user turn holding the prompt, then an assistant turn
holding the response).

Usage:
    python data/build_data.py           # (re)write both files
    python data/build_data.py --check   # exit 1 if the files on disk differ

Standard library only; Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
REPO_ROOT = DATA_DIR.parent
OUT_DIR = DATA_DIR / "instructions"
TRAIN_PATH = OUT_DIR / "train.jsonl"
HELDOUT_PATH = OUT_DIR / "heldout.jsonl"

# Every record whose id number is a multiple of this goes to held-out.
HELDOUT_EVERY = 6

# Bounds on response length, counted as whitespace-separated words.
MIN_RESPONSE_WORDS = 20
MAX_RESPONSE_WORDS = 120

# id prefix -> kind written to the "kind" field.
KINDS = {
    "expl": "explanation",
    "writ": "writing",
    "list": "list",
    "reas": "reasoning",
    "rewr": "rewrite",
    "clas": "classification",
}

ID_PATTERN = re.compile(r"^(?P<prefix>[a-z]{4})-(?P<number>\d{3})$")

Record = tuple[str, str, str]  # (id, prompt, response)

# Explanation: explain a concept simply (science, computing, everyday things).
EXPLANATION: list[Record] = [
    (
        "expl-001",
        "Why is the sky blue?",
        "Sunlight contains all the colours mixed together. When it passes through "
        "the air, it bumps into tiny gas molecules, which scatter short "
        "wavelengths, like blue, much more strongly than long ones, like red. That "
        "scattered blue light reaches your eyes from every part of the sky, so the "
        "sky looks blue. At sunrise and sunset the light travels through far more "
        "air, most of the blue is scattered away before it reaches you, and the "
        "remaining reds and oranges take over.",
    ),
    (
        "expl-002",
        "Explain what a computer's RAM does, in simple terms.",
        "RAM, or random-access memory, is the computer's short-term workspace. "
        "When you open a program or a file, the computer copies what it needs from "
        "slower long-term storage into RAM so the processor can reach it quickly. "
        "Think of it as a desk: the storage drive is a filing cabinet, and RAM is "
        "the desk surface where you spread out the papers you are working on right "
        "now. A bigger desk lets you work on more things at once. RAM is cleared "
        "when the power goes off.",
    ),
    (
        "expl-003",
        "How does a refrigerator keep food cold?",
        "A fridge moves heat from inside the box to the room outside. A special "
        "fluid called a refrigerant flows through pipes in a loop. Inside the "
        "fridge, the refrigerant evaporates, and evaporating absorbs heat, just as "
        "drying sweat cools your skin. A compressor then squeezes the vapour, "
        "making it hot, and pushes it through coils at the back, where it releases "
        "that heat into the kitchen and turns back into liquid. The cycle repeats, "
        "so the inside stays cold while the back of the fridge feels warm.",
    ),
    (
        "expl-004",
        "What is photosynthesis? Keep it simple.",
        "Photosynthesis is how plants make their own food. Their leaves take in "
        "carbon dioxide from the air and water from the soil, and use the energy "
        "in sunlight to turn them into sugar, which the plant uses to grow and "
        "stay alive. Oxygen is released as a by-product, which is one reason "
        "plants matter so much for the air we breathe. A green pigment called "
        "chlorophyll captures the light, and it is also why leaves look green.",
    ),
    (
        "expl-005",
        "Explain what an algorithm is to someone who has never programmed.",
        "An algorithm is a precise, step-by-step set of instructions for solving a "
        "problem or completing a task. A recipe is a good everyday example: it "
        "lists the steps in order, and if you follow them exactly you get the same "
        "cake every time. In computing, algorithms tell a computer how to do "
        "things like sort a list of names, find the shortest route on a map, or "
        "suggest a song. The important part is that each step is clear enough that "
        "no guessing is needed.",
    ),
    (
        "expl-006",
        "Why do we have seasons?",
        "Seasons happen because Earth's axis is tilted by about 23.5 degrees "
        "compared with its path around the Sun. As Earth orbits, first one "
        "hemisphere and then the other leans toward the Sun. The hemisphere tilted "
        "toward the Sun gets more direct sunlight for more hours each day, so it "
        "warms up and has summer. The one tilted away gets slanted, weaker light "
        "and shorter days, so it has winter. Distance is not the cause: Earth is "
        "actually closest to the Sun in early January.",
    ),
    (
        "expl-007",
        "What is the difference between weather and climate?",
        "Weather is what the atmosphere is doing at a particular place and time: "
        "today's rain, tomorrow's wind, this afternoon's temperature. Climate is "
        "the long-term pattern of weather in a region, usually averaged over "
        "thirty years or more. A handy way to remember it: weather is your mood on "
        "a given day, while climate is your personality. One cold week does not "
        "change a climate, but a steady shift in average conditions over decades "
        "does.",
    ),
    (
        "expl-008",
        "How does a password manager work?",
        "A password manager is an app that stores all your passwords in an "
        "encrypted vault, locked with one strong master password that only you "
        "know. When you visit a website, it can fill in the right username and "
        "password for you, and it can generate long random passwords that are very "
        "hard to guess. Because the vault is encrypted, anyone who steals the file "
        "sees only scrambled data. The benefit is that you can use a different "
        "strong password for every site while remembering just one.",
    ),
    (
        "expl-009",
        "Why does bread go stale?",
        "Bread goes stale mainly because of changes in its starch, not simply "
        "because it dries out. During baking, starch absorbs water and softens. As "
        "the loaf cools and sits, the starch molecules slowly line up again into "
        "firmer, crystal-like structures and push water out, making the crumb hard "
        "and crumbly. This happens fastest at fridge temperatures, which is why "
        "bread kept in the fridge stales quickly. Briefly warming stale bread in "
        "an oven can partly reverse the process.",
    ),
    (
        "expl-010",
        "What is a black hole?",
        "A black hole is a region of space where matter is packed so densely that "
        "its gravity becomes overwhelming; nothing that crosses a certain "
        "boundary, not even light, can escape. That boundary is called the event "
        "horizon. Many black holes form when a very massive star runs out of fuel "
        "and its core collapses under its own weight. We cannot see black holes "
        "directly, but we can detect them by how they pull on nearby stars and by "
        "the hot, glowing gas swirling around them.",
    ),
    (
        "expl-011",
        "Explain what DNS does on the internet.",
        "DNS, the Domain Name System, works like the internet's phone book. "
        "Computers find each other using numeric addresses called IP addresses, "
        "but people prefer names like example.org. When you type a web address, "
        "your device asks a DNS server which IP address belongs to that name. The "
        "server replies with the number, and your browser then connects to the "
        "right machine. Answers are remembered for a while, so repeated visits to "
        "the same site are faster.",
    ),
    (
        "expl-012",
        "How do vaccines help the body fight disease?",
        "A vaccine gives your immune system a safe preview of a germ. It contains "
        "a harmless piece of the germ, a weakened or inactivated form of it, or "
        "instructions that let your cells make one of its proteins. Your immune "
        "system reacts by making antibodies and memory cells tuned to that target. "
        "If you later meet the real germ, your body recognises it quickly and "
        "fights it off before it can make you seriously ill. It is like practising "
        "a fire drill before a real fire.",
    ),
    (
        "expl-013",
        "What is inflation in economics?",
        "Inflation is a general rise in prices across an economy over time, which "
        "means each unit of money buys a little less than before. If a loaf of "
        "bread costs 2 pounds this year and 2.10 next year, and most other prices "
        "rise in a similar way, inflation is about 5 percent. Moderate, steady "
        "inflation is normal in many economies. Problems arise when it is very "
        "high, because savings lose value quickly, or when prices keep falling, "
        "which can make people put off spending.",
    ),
    (
        "expl-014",
        "Explain recursion in programming with a simple example.",
        "Recursion is when a function solves a problem by calling itself on a "
        "smaller version of the same problem. Every recursive function needs a "
        "stopping point, called a base case, or it would run forever. For example, "
        "the factorial of 4 is 4 x 3 x 2 x 1. A function can say: the factorial of "
        "n is n times the factorial of n minus 1, and the factorial of 1 is just "
        "1. So factorial(4) becomes 4 x factorial(3), and so on down to 1, and the "
        "results multiply back up to 24.",
    ),
    (
        "expl-015",
        "Why does ice float on water?",
        "Ice floats because it is less dense than liquid water. When water "
        "freezes, its molecules lock into a regular hexagonal pattern held "
        "together by hydrogen bonds, and this arrangement leaves more empty space "
        "between molecules than in the liquid. The same mass takes up about nine "
        "percent more volume, so ice is lighter for its size and rises to the top. "
        "This is unusual, since most substances are denser as solids, and it lets "
        "lakes freeze from the top down, protecting life underneath.",
    ),
    (
        "expl-016",
        "How does GPS figure out where I am?",
        "GPS relies on a network of satellites, each constantly broadcasting its "
        "position and the exact time from an onboard atomic clock. Your phone "
        "picks up signals from several satellites and measures how long each one "
        "took to arrive. Since the signals travel at the speed of light, the delay "
        "tells the receiver how far away each satellite is. With distances to at "
        "least four satellites, it can work out its position on Earth and correct "
        "its own clock error. Your phone never sends anything back to the "
        "satellites.",
    ),
    (
        "expl-017",
        "What does a compiler do?",
        "A compiler translates a program written in a human-readable programming "
        "language, such as C or Rust, into machine code that a computer's "
        "processor can run directly. Along the way it checks the code for certain "
        "mistakes, such as misspelled names or mismatched types, and reports them "
        "before the program ever runs. Many compilers also optimise the code, "
        "rearranging it so it runs faster or uses less memory while doing exactly "
        "the same thing. The result is usually a standalone executable file.",
    ),
    (
        "expl-018",
        "Explain compound interest simply.",
        "Compound interest means you earn interest not only on the money you put "
        "in, but also on the interest you have already earned. Suppose you save "
        "100 dollars at 10 percent a year. After one year you have 110. In the "
        "second year you earn 10 percent of 110, which is 11, giving you 121. Each "
        "year the amount added grows a little larger, so over long periods the "
        "total grows faster and faster. The same effect works against you when you "
        "owe money on a loan or credit card.",
    ),
    (
        "expl-019",
        "Why do onions make you cry?",
        "When you cut an onion, you break open its cells and release enzymes that "
        "react with sulfur-containing compounds inside. This produces a gas called "
        "syn-propanethial-S-oxide, which drifts up to your eyes. There it "
        "irritates nerve endings on the surface of the eye, so your eyes respond "
        "by producing tears to wash the irritant away. Chilling the onion first, "
        "using a sharp knife that crushes fewer cells, or cutting near a gentle "
        "fan can reduce the effect.",
    ),
    (
        "expl-020",
        "What is the difference between a virus and a bacterium?",
        "Bacteria are single-celled living organisms. They have their own "
        "machinery to grow and divide, many are harmless or even helpful, like "
        "those in your gut, and infections they cause can often be treated with "
        "antibiotics. Viruses are much smaller and are not cells at all; they are "
        "bits of genetic material in a protein coat that can only reproduce by "
        "hijacking the cells of a host. Antibiotics do not work on viruses, which "
        "is why they are not prescribed for colds or flu.",
    ),
    (
        "expl-021",
        "What do people mean by the cloud in computing?",
        "When people talk about the cloud, they simply mean computers owned and "
        "run by someone else that you use over the internet. When you store photos "
        "in an online service, stream a film, or use a web-based document editor, "
        "the files and the processing live in large data centres rather than on "
        "your own device. The advantages are that you can reach your data from "
        "anywhere and you do not have to maintain the hardware. The trade-off is "
        "that you depend on an internet connection and on the provider.",
    ),
    (
        "expl-022",
        "How does a microwave oven heat food?",
        "A microwave oven produces microwaves, a type of radio wave, using a "
        "device called a magnetron. These waves make water molecules in the food "
        "rapidly twist back and forth as they try to line up with a constantly "
        "changing electric field. That motion is passed on to neighbouring "
        "molecules as heat. This is why foods with more water heat faster, and why "
        "food can heat unevenly, leaving cold spots. The turntable helps spread "
        "the energy more evenly. Microwaving does not make food radioactive.",
    ),
    (
        "expl-023",
        "What is a budget and why is it useful?",
        "A budget is a plan for how you will use your money over a set period, "
        "usually a month. You list your expected income, then decide how much goes "
        "to essentials like rent and food, how much to savings, and how much to "
        "everything else. Its main use is giving you control: instead of wondering "
        "where your money went, you decide in advance. A budget also shows where "
        "you can cut back, helps you save for goals, and makes it easier to avoid "
        "debt.",
    ),
    (
        "expl-024",
        "Why does metal feel colder than wood when both are at room temperature?",
        "A metal spoon and a wooden spoon in the same room are the same "
        "temperature, yet the metal feels colder. That is because your skin senses "
        "how fast heat leaves it, not temperature directly. Metal is a good "
        "conductor, so it draws heat away from your warm fingers quickly. Wood is "
        "a poor conductor, so heat leaves your skin slowly and it feels closer to "
        "neutral. On a very hot day the effect flips: metal feels hotter because "
        "it delivers heat to your skin quickly.",
    ),
    (
        "expl-025",
        "What is machine learning, in plain language?",
        "Machine learning is a way of building computer programs that learn "
        "patterns from examples instead of following rules written out by hand. "
        "For instance, rather than listing every feature of a spam email, you show "
        "a program thousands of emails labelled spam or not spam, and it adjusts "
        "itself until it can tell them apart. Once trained, it can make guesses "
        "about new examples it has never seen. The quality of the results depends "
        "heavily on how good and how varied the examples are.",
    ),
    (
        "expl-026",
        "How do noise-cancelling headphones work?",
        "Noise-cancelling headphones have small microphones that listen to the "
        "sound around you. A chip analyses that sound and quickly produces an "
        "opposite sound wave, where every peak of the noise is matched by a dip. "
        "When the two waves meet, they largely cancel each other out, an effect "
        "called destructive interference. This works best for steady, low-pitched "
        "sounds like engine hum or air conditioning. Sudden or high-pitched noises "
        "are harder to cancel, so the padding of the ear cups also helps block "
        "them.",
    ),
    (
        "expl-027",
        "Why is the ocean salty?",
        "Rain is slightly acidic, and as it falls on land it slowly dissolves "
        "minerals from rocks. Rivers carry these dissolved salts into the sea. "
        "When seawater evaporates, the water leaves but the salts stay behind, so "
        "over millions of years they have built up. Vents on the sea floor add "
        "more minerals too. Rivers and many lakes stay fresh because their water "
        "keeps flowing onward, while the ocean is the end of the line, so the salt "
        "collects there. The most common salt in seawater is sodium chloride.",
    ),
    (
        "expl-028",
        "What is an API?",
        "An API, or application programming interface, is a defined way for one "
        "piece of software to ask another for information or services. Think of a "
        "restaurant menu: you do not need to know how the kitchen works, you just "
        "order from a list of options and get a dish back. Similarly, a weather "
        "app might call a weather service's API with a city name and receive the "
        "forecast in a standard format. APIs let programs work together without "
        "knowing each other's internal details.",
    ),
    (
        "expl-029",
        "Explain how a rainbow forms.",
        "A rainbow appears when sunlight shines on falling raindrops while the Sun "
        "is behind you. As light enters a drop it bends, and different colours "
        "bend by slightly different amounts, which spreads white light into its "
        "colours. The light then reflects off the back of the drop and bends again "
        "on its way out. Each colour leaves at a slightly different angle, roughly "
        "40 to 42 degrees from the point directly opposite the Sun, so you see red "
        "on the outside of the arc and violet on the inside.",
    ),
    (
        "expl-030",
        "Why do cats purr?",
        "Cats purr by rapidly twitching the muscles of their voice box, which "
        "makes the vocal folds vibrate as they breathe in and out. Purring is "
        "often a sign of contentment, such as when a cat is being stroked, but "
        "cats also purr when they are stressed, hurt or giving birth, so it seems "
        "to be a way of calming themselves as well. Kittens purr while nursing, "
        "which may tell their mother that all is well. Some researchers think the "
        "vibrations may even help with healing.",
    ),
    (
        "expl-031",
        "How is a file different from a folder on a computer?",
        "A file is a single item that holds data, such as a photo, a letter you "
        "typed, a song or a program. A folder, also called a directory, is a "
        "container that holds files and other folders so you can keep things "
        "organised. The comparison with a paper office works well: a file is a "
        "document, and a folder is the cardboard folder you put related documents "
        "into. Folders can sit inside other folders, forming a tree-like structure.",
    ),
    (
        "expl-032",
        "Explain what electricity is in simple words.",
        "Electricity is the flow of tiny charged particles called electrons. In "
        "metal wires, some electrons are loosely held and can drift from atom to "
        "atom. When a battery or power station pushes on them, they move along the "
        "wire in a steady stream called an electric current. That moving charge "
        "can do useful work: it heats the wire in a toaster, turns the motor in a "
        "fan, or lights an LED. Voltage is the push, current is the rate of flow, "
        "and resistance is how much the material opposes that flow.",
    ),
    (
        "expl-033",
        "How does soap clean things?",
        "Soap molecules have two different ends. One end is attracted to water, "
        "and the other end avoids water but clings to oils and grease. When you "
        "wash, the oil-loving ends stick into greasy dirt while the water-loving "
        "ends face outward. The molecules surround tiny droplets of grease, "
        "forming little bundles called micelles, which water can then rinse away. "
        "Soap also breaks apart the fatty outer layer of many germs, which is why "
        "washing your hands with soap for about twenty seconds is so effective.",
    ),
    (
        "expl-034",
        "What is encryption?",
        "Encryption is a way of scrambling information so that only someone with "
        "the right key can read it. A message is run through a mathematical "
        "process that turns it into what looks like random nonsense. The intended "
        "recipient uses a key to reverse the process and recover the original. "
        "Encryption protects things like online banking, messaging apps and stored "
        "passwords. Even if someone intercepts the scrambled data, it is useless "
        "to them without the key.",
    ),
    (
        "expl-035",
        "Why do leaves change colour in autumn?",
        "Leaves are green in summer because they are full of chlorophyll, the "
        "pigment plants use to capture sunlight. As days get shorter and cooler in "
        "autumn, many trees stop making chlorophyll and break down what is left. "
        "This lets other pigments that were hidden underneath show through, such "
        "as the yellows and oranges of carotenoids. Some trees also produce new "
        "red and purple pigments called anthocyanins at this time. Eventually the "
        "tree seals off each leaf at its base, and the leaf falls.",
    ),
    (
        "expl-036",
        "What does a router do in a home network?",
        "A home router connects your devices to each other and to the internet. "
        "Your internet provider gives your home one connection, and the router "
        "shares it among your phone, laptop, television and anything else, keeping "
        "track of which incoming data belongs to which device. Most home routers "
        "also create the Wi-Fi network, hand out local addresses to devices, and "
        "include a basic firewall that blocks unwanted incoming connections. Think "
        "of it as a post room that sorts the mail for everyone in a building.",
    ),
    (
        "expl-037",
        "Explain the water cycle.",
        "The water cycle is the continuous movement of water around the Earth. The "
        "Sun heats oceans, lakes and rivers, and water evaporates into vapour; "
        "plants also release vapour from their leaves. As the vapour rises, it "
        "cools and condenses into tiny droplets that form clouds. When the "
        "droplets combine and grow heavy, they fall as rain, snow or hail. That "
        "water runs off into rivers, soaks into the ground, or collects in lakes "
        "and seas, and then the cycle starts again.",
    ),
    (
        "expl-038",
        "What is a carbon footprint?",
        "A carbon footprint is the total amount of greenhouse gases, mostly carbon "
        "dioxide, released as a result of the activities of a person, product or "
        "organisation. It includes direct emissions, such as burning petrol in a "
        "car, and indirect ones, such as the energy used to grow the food you eat "
        "or make the clothes you buy. It is usually measured in tonnes of carbon "
        "dioxide equivalent per year. Knowing your footprint helps you see which "
        "changes, like flying less, would make the biggest difference.",
    ),
    (
        "expl-039",
        "How does a search engine find web pages so fast?",
        "A search engine does most of its work before you ever type a query. "
        "Automated programs called crawlers constantly visit web pages, follow "
        "links and copy what they find. The engine then builds an index, a giant "
        "lookup table that maps each word to the pages containing it, much like "
        "the index at the back of a book. When you search, it does not scan the "
        "whole web; it looks up your words in the index and ranks the matching "
        "pages using signals such as relevance and quality.",
    ),
    (
        "expl-040",
        "Why do we need sleep?",
        "Sleep gives the body and brain time to recover and maintain themselves. "
        "During sleep, the brain sorts and stores memories from the day, which "
        "helps learning, and it appears to clear away waste products that build up "
        "while we are awake. The body uses sleep to repair tissues, regulate "
        "hormones and support the immune system. Without enough sleep, people "
        "struggle to concentrate, react more slowly and feel moodier, and over "
        "time they face higher risks of health problems. Most adults need about "
        "seven to nine hours a night.",
    ),
]

# Short writing: notes, descriptions, short poems, product blurbs.
WRITING: list[Record] = [
    (
        "writ-001",
        "Write a short thank-you note to a neighbour who watered my plants while I "
        "was away.",
        "Dear Sam, thank you so much for looking after my plants while I was away. "
        "I came home to find every one of them healthy and green, even the fussy "
        "fern that usually sulks. I really appreciate you taking the time, and I "
        "hope you will let me return the favour whenever you need it.",
    ),
    (
        "writ-002",
        "Write a four-line poem about the first snow of winter.",
        "Overnight the world went quiet,\n"
        "soft and white on every street;\n"
        "the garden wears a brand-new blanket\n"
        "stitched with tiny bird-track feet.",
    ),
    (
        "writ-003",
        "Write a three-sentence product description for a reusable water bottle.",
        "Stay refreshed all day with our double-walled steel bottle, which keeps "
        "drinks cold for 24 hours or hot for 12. The leak-proof lid and slim shape "
        "mean it slides easily into a bag or a car cup holder. It is free of BPA, "
        "easy to clean, and built to replace hundreds of single-use plastic "
        "bottles.",
    ),
    (
        "writ-004",
        "Write a brief message to a colleague letting them know I will be late to "
        "this morning's meeting.",
        "Hi Priya, just a quick heads-up that I am running about fifteen minutes "
        "late for this morning's meeting because my train is delayed. Please go "
        "ahead and start without me; I will catch up on anything I miss when I "
        "arrive. Sorry for the inconvenience.",
    ),
    (
        "writ-005",
        "Describe a busy market on a Saturday morning in three or four sentences.",
        "By nine o'clock the market is already humming, with stallholders calling "
        "out prices over the clatter of crates. The air smells of fresh bread, "
        "ripe strawberries and strong coffee from the van on the corner. Shoppers "
        "weave between the stalls with bulging bags, stopping to taste cheese or "
        "to choose a bunch of flowers. Somewhere near the fountain, a busker is "
        "playing an old folk tune on a violin.",
    ),
    (
        "writ-006",
        "Write a short poem about a cup of tea.",
        "Steam curls up like a quiet thought,\n"
        "the kettle's song now still;\n"
        "I wrap my hands around the warmth\n"
        "and watch the window fill\n"
        "with afternoon and falling rain,\n"
        "with nothing left to do\n"
        "but sip, and let the hour be slow,\n"
        "and let the tea steep through.",
    ),
    (
        "writ-007",
        "Write a product blurb for a small desk lamp aimed at students.",
        "Meet the lamp that keeps up with late-night study sessions. Its flexible "
        "arm puts light exactly where you need it, and three brightness levels let "
        "you switch from focused reading light to a soft evening glow. It runs on "
        "USB power, takes up less space than a textbook, and stays cool to the "
        "touch even after hours of revision.",
    ),
    (
        "writ-008",
        "Write a two-sentence birthday message for my grandmother, who is turning "
        "80.",
        "Happy 80th birthday, Grandma! Thank you for a lifetime of stories, warm "
        "hugs and the best apple pie in the world; I hope today is full of the "
        "love and laughter you have always given to all of us.",
    ),
    (
        "writ-009",
        "Write a short sign for a shared office fridge asking people to label "
        "their food.",
        "Friendly reminder: please label your food with your name and the date "
        "before putting it in the fridge. Every Friday afternoon, anything "
        "unlabelled or past its date will be thrown away so there is room for "
        "everyone. Thanks for helping keep our shared kitchen clean and fair!",
    ),
    (
        "writ-010",
        "Describe an old lighthouse in three sentences.",
        "The lighthouse stands alone at the end of the rocky point, its white "
        "paint peeling in long strips after decades of salty wind. A narrow iron "
        "staircase spirals up inside to the lamp room, where the great glass lens "
        "still catches the afternoon sun. At night it no longer shines, but gulls "
        "still circle it as if they remember when it did.",
    ),
    (
        "writ-011",
        "Write a haiku about autumn leaves, then explain its image in one sentence.",
        "Red leaves let go now,\n"
        "drifting down on the cool wind;\n"
        "the tree breathes slowly.\n"
        "\n"
        "The image is of a tree calmly releasing its leaves, as if autumn were a "
        "long, quiet breath out before winter.",
    ),
    (
        "writ-012",
        "Write a short welcome message for new members of a community gardening "
        "club.",
        "Welcome to the Riverside Gardening Club! Whether you have grown "
        "prize-winning tomatoes or never held a trowel, you belong here. We meet "
        "every Saturday at ten at the allotments on Mill Lane, and tools, gloves "
        "and tea are always provided. Come along, get your hands dirty, and meet "
        "some friendly faces.",
    ),
    (
        "writ-013",
        "Write a three-sentence product description for a pair of hiking boots.",
        "Built for rough trails and long days, these hiking boots combine a "
        "waterproof leather upper with a breathable lining to keep your feet dry "
        "from both rain and sweat. A deep-lugged rubber sole grips firmly on mud, "
        "rock and loose gravel. Cushioned insoles and a padded ankle collar mean "
        "you can walk for hours in comfort, straight out of the box.",
    ),
    (
        "writ-014",
        "Write a short apology to a friend for missing their party.",
        "Hey Leo, I am really sorry I missed your party on Saturday. I came down "
        "with a bad cold and did not want to pass it on to everyone, but I hated "
        "missing the celebration. I hope it was a great night, and I would love to "
        "take you out for dinner next week to make up for it.",
    ),
    (
        "writ-015",
        "Write a short poem about the sea at night.",
        "The sea at night is a sleeping giant,\n"
        "breathing in and breathing out;\n"
        "the moon lays down a silver pathway\n"
        "where the small waves turn about.\n"
        "No ship, no gull, no voice, no hurry,\n"
        "only the hush of salt and stone,\n"
        "and the patient tide returning\n"
        "to the shore it has always known.",
    ),
    (
        "writ-016",
        "In a few sentences, describe the smell of a bakery early in the morning.",
        "Stepping into the bakery at dawn is like walking into a warm blanket of "
        "scent. The rich, toasty smell of crusts baking mingles with sweet notes "
        "of butter, cinnamon and melting sugar. Underneath it all is the faint, "
        "yeasty tang of dough resting on the counters, promising the next batch. "
        "It is the kind of smell that makes you hungry even if you have just eaten.",
    ),
    (
        "writ-017",
        "Write a product blurb for a children's picture book about a brave little "
        "snail.",
        "Sheldon is the smallest snail in the garden, and everyone says he is far "
        "too slow for adventures. But when a storm washes his best friend's leaf "
        "away, Sheldon sets off on a journey across the great wide lawn. With "
        "gentle humour and bright watercolour illustrations, this story shows "
        "young readers that courage has nothing to do with speed. Perfect for ages "
        "three to six.",
    ),
    (
        "writ-018",
        "Write a short automatic out-of-office email reply.",
        "Thank you for your email. I am out of the office until Monday and have "
        "limited access to email while I am away. I will reply to your message as "
        "soon as possible after I return. If your request is urgent, please "
        "contact my colleague Dana Okafor on the main office number, who will be "
        "happy to help.",
    ),
    (
        "writ-019",
        "Write a rhyming couplet about Monday mornings, then say in one sentence "
        "what mood it captures.",
        "My alarm clock wails, the kettle's slow,\n"
        "and Friday's still so far to go.\n"
        "\n"
        "It captures the sleepy, slightly grumpy feeling of facing a whole working "
        "week ahead.",
    ),
    (
        "writ-020",
        "Write a short description of a cosy reading corner.",
        "In the corner by the window sits a deep armchair with a faded patchwork "
        "quilt folded over one arm. A tall lamp casts a warm circle of light onto "
        "a small table holding a mug and a stack of well-thumbed paperbacks. "
        "Shelves rise on either side, crammed with books in no particular order. "
        "It is the kind of spot where an hour disappears without anyone noticing.",
    ),
    (
        "writ-021",
        "Write a note to my child's teacher explaining that she will miss tomorrow "
        "morning for a dental appointment.",
        "Dear Ms Harper, I am writing to let you know that Aisha will be absent "
        "tomorrow morning because she has a dental appointment at 9:30. She should "
        "be back in class by lunchtime. Please let me know if there is any work "
        "she needs to catch up on. Thank you for your understanding.",
    ),
    (
        "writ-022",
        "Write a short poem about a city waking up.",
        "The streetlights blink and fade to grey,\n"
        "the first bus sighs along its way;\n"
        "a baker lifts a metal door,\n"
        "a pigeon struts the pavement floor.\n"
        "The windows glow in ones and twos,\n"
        "the cafe hums with morning news,\n"
        "and slowly, like a stretching cat,\n"
        "the city yawns, and that is that.",
    ),
    (
        "writ-023",
        "Write a product description for a handmade ceramic mug.",
        "Each of these mugs is thrown by hand on a potter's wheel in our small "
        "studio, so no two are exactly alike. The speckled glaze, in shades of sea "
        "green and sand, gives every piece its own character. It holds a generous "
        "350 millilitres, has a comfortable wide handle, and is safe in the "
        "dishwasher and microwave. A small everyday object, made to be used and "
        "loved.",
    ),
    (
        "writ-024",
        "Write a short congratulations message for a friend who just got their "
        "first job.",
        "Congratulations on landing your first job! All those applications and "
        "interviews have paid off, and your new team is lucky to have you. I know "
        "you will bring the same energy and kindness to the role that you bring to "
        "everything else. Let's celebrate this weekend, my treat.",
    ),
    (
        "writ-025",
        "Describe an approaching thunderstorm in three or four sentences.",
        "The afternoon light turns a strange yellow-grey as heavy clouds pile up "
        "over the hills. A sudden gust flips the leaves on the trees to their pale "
        "undersides and sends a plastic chair skidding across the patio. Far off, "
        "thunder rolls like furniture being dragged across a floor upstairs. Then "
        "the first fat drops hit the dry pavement, each one leaving a dark, "
        "coin-sized mark.",
    ),
    (
        "writ-026",
        "Write a short reminder message for our book club's next meeting.",
        "Hi everyone, a reminder that our book club meets this Thursday at 7 pm at "
        "Maya's flat. We will be discussing the first half of the novel, so do not "
        "worry if you have not finished it yet. Please bring a snack to share if "
        "you can, and let Maya know by Wednesday if you cannot make it.",
    ),
    (
        "writ-027",
        "Write a short poem about a dog waiting by the door.",
        "He hears your key before you do,\n"
        "his tail already wagging through;\n"
        "he's waited since the morning light,\n"
        "nose pressed against the door so tight.\n"
        "No clock to tell him time has passed,\n"
        "just certainty you'll come at last;\n"
        "and when you do, his joy appears\n"
        "in wagging tail and flopping ears.",
    ),
    (
        "writ-028",
        "Write a product blurb for a weekly meal-planning app.",
        "Stop staring into the fridge wondering what to cook. Our meal-planning "
        "app builds a week of simple, balanced dinners around your tastes, budget "
        "and dietary needs, then turns them into a single shopping list sorted by "
        "supermarket aisle. Swap any meal with one tap, use up leftovers with "
        "smart suggestions, and spend less time deciding and more time eating.",
    ),
    (
        "writ-029",
        "Write a short note thanking a bus driver who handed in my lost wallet.",
        "I want to say a huge thank you to the driver of the number 14 bus who "
        "found my wallet on Tuesday evening and handed it in at the depot. "
        "Everything was still inside, including cards that would have been a real "
        "headache to replace. Your honesty made my week, and I am truly grateful.",
    ),
    (
        "writ-030",
        "Describe a quiet forest path in early spring.",
        "The path winds gently between tall beech trees whose branches are just "
        "beginning to show a haze of pale green. Clusters of white wood anemones "
        "and yellow primroses dot the forest floor, and the earth smells damp and "
        "fresh after last night's rain. A woodpecker drums somewhere out of sight. "
        "With each step, old leaves crunch softly underfoot, the last reminder of "
        "autumn.",
    ),
    (
        "writ-031",
        "Write a limerick about a forgetful cat.",
        "A forgetful old cat named Lenore\n"
        "would yowl to be let out the door;\n"
        "but when they opened it wide,\n"
        "she'd forget what's outside,\n"
        "and go back to her nap on the floor.",
    ),
    (
        "writ-032",
        "Write a short welcome note for guests staying in a holiday cottage.",
        "Welcome to Bramble Cottage! We hope you have a wonderful, relaxing stay. "
        "You will find fresh milk, bread and a few local treats in the kitchen, "
        "and spare blankets in the cupboard at the top of the stairs. The Wi-Fi "
        "password is on the fridge, and our phone number is inside the front cover "
        "of the guest book if you need anything at all.",
    ),
    (
        "writ-033",
        "Write a product blurb for a pair of wireless earbuds.",
        "Enjoy clear, rich sound without the tangle. These wireless earbuds give "
        "you up to eight hours of listening on a single charge, with another "
        "twenty-four hours stored in the pocket-sized case. Touch controls let you "
        "skip tracks or take calls with a tap, and the soft silicone tips come in "
        "three sizes for a secure, comfortable fit during workouts or your daily "
        "commute.",
    ),
    (
        "writ-034",
        "Write a few sentences describing a grandmother's kitchen.",
        "My grandmother's kitchen was small and always warm, with a kettle that "
        "never seemed to go fully cold. Jars of homemade jam lined the windowsill, "
        "glowing red and amber when the sun came through. A radio murmured in the "
        "corner while she rolled pastry on the scrubbed wooden table. Everything "
        "smelled faintly of cinnamon, soap and something good in the oven.",
    ),
    (
        "writ-035",
        "Write a short poem about rain on a window.",
        "Rain taps the glass with tiny fingers,\n"
        "writing notes I cannot read;\n"
        "each drop pauses, wobbles, lingers,\n"
        "then runs down at sudden speed.\n"
        "Inside, the lamp is warm and yellow,\n"
        "outside, the street is grey and wide,\n"
        "and I am glad, a lucky fellow,\n"
        "to watch the weather from inside.",
    ),
    (
        "writ-036",
        "Write a short farewell message for a colleague who is retiring after "
        "thirty years.",
        "After thirty years of wisdom, patience and terrible puns, it is hard to "
        "imagine the office without you, Martin. You taught so many of us how to "
        "do the job well and how to laugh when things went wrong. We wish you a "
        "long, happy retirement full of gardening, travel and lazy mornings. "
        "Please come back and visit often.",
    ),
    (
        "writ-037",
        "Write a product description for a plant-based protein bar.",
        "Packed with 15 grams of plant protein from peas and almonds, this bar is "
        "the easy snack for busy days. It has a soft, chewy texture and a rich "
        "dark chocolate and sea salt flavour, with no artificial sweeteners. Toss "
        "one in your bag for a post-workout boost or a mid-afternoon pick-me-up "
        "that actually keeps you going until dinner.",
    ),
    (
        "writ-038",
        "Write a short message to my landlord reporting a leaking kitchen tap.",
        "Dear Mr Patel, I am writing to let you know that the kitchen tap in flat "
        "4 has started leaking steadily, even when it is fully turned off. I have "
        "put a bowl underneath for now, but it is wasting water and getting worse. "
        "Could you please arrange for a plumber to take a look this week? I am "
        "home most evenings after six. Many thanks.",
    ),
    (
        "writ-039",
        "Describe a small child's first day at the beach in a few sentences.",
        "At first she hung back, clutching her bucket and staring at the big, "
        "noisy waves. Then a small wave rushed up and tickled her toes, and she "
        "shrieked with laughter and ran back for more. By lunchtime she had built "
        "three wobbly sandcastles, collected a pocketful of shells and tasted salt "
        "on her lips. She fell asleep in the car before we had even left the car "
        "park.",
    ),
    (
        "writ-040",
        "Write a short poem celebrating small everyday kindnesses.",
        "A door held open, a seat given up,\n"
        "a stranger's smile, a refilled cup;\n"
        "a text that says I thought of you,\n"
        "a coat lent when the wind blew through.\n"
        "They will not make the evening news,\n"
        "they win no prize or praise,\n"
        "yet quietly these small good deeds\n"
        "warm up our ordinary days.",
    ),
]

# Lists: N items, each with a one-line reason.
LISTS: list[Record] = [
    (
        "list-001",
        "List five tips for getting better sleep, with a short reason for each.",
        "1. Keep a regular schedule, because going to bed and waking at the same "
        "times trains your body clock.\n"
        "2. Limit screens in the last hour before bed, since bright light can "
        "delay the release of sleep hormones.\n"
        "3. Avoid caffeine after early afternoon, as its effects can last for many "
        "hours.\n"
        "4. Keep the bedroom cool, dark and quiet, which makes it easier to fall "
        "and stay asleep.\n"
        "5. Get some daylight and exercise during the day, because both help you "
        "feel ready for sleep at night.",
    ),
    (
        "list-002",
        "Name three healthy snacks to keep at work, with one reason each.",
        "1. A handful of unsalted nuts: they provide protein and healthy fats that "
        "keep you full.\n"
        "2. An apple with a little peanut butter: the fibre and protein give "
        "steady energy without a sugar crash.\n"
        "3. Plain yoghurt with berries: it is filling and rich in calcium, and the "
        "berries add vitamins and natural sweetness.",
    ),
    (
        "list-003",
        "Give me four ways to save money on groceries and explain each briefly.",
        "1. Plan meals for the week before shopping, so you buy only what you will "
        "actually use.\n"
        "2. Shop with a list and stick to it, which cuts down on impulse buys.\n"
        "3. Compare prices per kilogram or per litre rather than per pack, since "
        "bigger or branded packs are not always cheaper.\n"
        "4. Cook extra portions and freeze them, which reduces waste and saves you "
        "from buying takeaway on busy nights.",
    ),
    (
        "list-004",
        "Suggest five board games for a family evening, with a reason for each.",
        "1. Chess, because it rewards careful thinking and can be enjoyed at "
        "almost any age.\n"
        "2. Scrabble, since it builds vocabulary while staying competitive and "
        "fun.\n"
        "3. Snakes and ladders, which is pure luck and perfect for young "
        "children.\n"
        "4. Monopoly, for long, lively sessions full of trading and bargaining.\n"
        "5. Cluedo, because solving the mystery encourages logical reasoning and "
        "plenty of dramatic accusations.",
    ),
    (
        "list-005",
        "Give three reasons why learning a second language is worthwhile.",
        "1. It lets you communicate with many more people, whether you are "
        "travelling, working or making friends.\n"
        "2. It gives you deeper access to other cultures, including books, films "
        "and music in their original form.\n"
        "3. It exercises the brain, training memory and attention, and some "
        "studies suggest bilingual people switch between tasks more easily.",
    ),
    (
        "list-006",
        "List four essential items for a basic first-aid kit and why each is "
        "needed.",
        "1. Adhesive plasters in several sizes, to cover small cuts and blisters.\n"
        "2. Sterile gauze pads and a roll of medical tape, for larger wounds that "
        "need covering and gentle pressure.\n"
        "3. Antiseptic wipes, to clean wounds and reduce the risk of infection.\n"
        "4. Disposable gloves, to protect both you and the injured person when "
        "dealing with blood.",
    ),
    (
        "list-007",
        "Name five programming languages a beginner might learn, with one reason "
        "each.",
        "1. Python, because its clean, readable syntax lets beginners focus on "
        "ideas rather than punctuation.\n"
        "2. JavaScript, since it runs in every web browser and lets you build "
        "interactive pages quickly.\n"
        "3. Scratch, a visual block-based language that teaches logic to children "
        "and complete newcomers.\n"
        "4. Java, which is widely used in education and teaches solid structure "
        "and object-oriented design.\n"
        "5. SQL, because almost every job that touches data involves querying "
        "databases.",
    ),
    (
        "list-008",
        "List three houseplants that are hard to kill, with a reason for each.",
        "1. Snake plant: it tolerates low light and can go weeks without water.\n"
        "2. Pothos: it grows happily in most rooms, and its drooping leaves "
        "clearly tell you when it is thirsty.\n"
        "3. ZZ plant: its thick underground stems store water, so it copes well "
        "with being forgotten.",
    ),
    (
        "list-009",
        "Give four tips for writing a clear email, with a reason for each.",
        "1. Use a specific subject line, so the reader knows what the email is "
        "about before opening it.\n"
        "2. Put your main point or request in the first two sentences, because "
        "busy readers may not read to the end.\n"
        "3. Keep paragraphs short, which makes the message easier to scan.\n"
        "4. End with a clear next step or deadline, so nobody is left wondering "
        "what to do.",
    ),
    (
        "list-010",
        "List five fruits that are high in vitamin C and say why each is a good "
        "choice.",
        "1. Oranges, the classic source, with one medium fruit covering most of an "
        "adult's daily need.\n"
        "2. Kiwis, which contain even more vitamin C per gram than oranges.\n"
        "3. Strawberries, a sweet option that also provides fibre and "
        "antioxidants.\n"
        "4. Guavas, among the richest sources of all, with several times the "
        "vitamin C of an orange by weight.\n"
        "5. Papaya, which adds plenty of vitamin A as well and is gentle on the "
        "stomach.",
    ),
    (
        "list-011",
        "Name four ways to cut down on plastic waste at home, with one reason each.",
        "1. Carry reusable shopping bags, which replace dozens of single-use bags "
        "a year.\n"
        "2. Buy loose fruit and vegetables instead of pre-packed ones, avoiding "
        "unnecessary wrapping.\n"
        "3. Use a refillable water bottle, since bottled water is one of the most "
        "common sources of plastic waste.\n"
        "4. Choose bar soap and shampoo bars, which usually come in paper "
        "packaging or none at all.",
    ),
    (
        "list-012",
        "List three good habits for a new runner and why they matter.",
        "1. Start slowly and mix running with walking, because building up "
        "gradually helps prevent injuries.\n"
        "2. Increase your weekly distance only a little at a time, giving muscles, "
        "tendons and joints time to adapt.\n"
        "3. Wear shoes that fit well and suit your stride, since poor footwear is "
        "a common cause of aches and pains.",
    ),
    (
        "list-013",
        "Give five ideas for a rainy-day activity with kids, each with a short "
        "reason.",
        "1. Build a blanket fort, which sparks imaginative play and keeps them "
        "busy for hours.\n"
        "2. Bake simple biscuits together, practising measuring and counting along "
        "the way.\n"
        "3. Hold an indoor treasure hunt with written clues, which is great for "
        "reading and problem-solving.\n"
        "4. Put on a puppet show with old socks, which encourages storytelling and "
        "creativity.\n"
        "5. Do a jigsaw puzzle as a family, a calm activity that builds patience "
        "and teamwork.",
    ),
    (
        "list-014",
        "List four benefits of walking every day, explaining each in a line.",
        "1. It strengthens the heart and lungs, lowering the risk of heart "
        "disease.\n"
        "2. It helps manage weight, because it burns energy without needing any "
        "special equipment.\n"
        "3. It lifts mood and reduces stress, partly thanks to fresh air and time "
        "away from screens.\n"
        "4. It keeps joints and muscles moving, which helps maintain balance and "
        "mobility as we age.",
    ),
    (
        "list-015",
        "Name three famous scientists and one reason each is remembered.",
        "1. Marie Curie, for pioneering research on radioactivity and becoming the "
        "first person to win Nobel Prizes in two different sciences.\n"
        "2. Isaac Newton, for his laws of motion and theory of universal "
        "gravitation, which shaped physics for centuries.\n"
        "3. Charles Darwin, for explaining how species change over time through "
        "natural selection.",
    ),
    (
        "list-016",
        "List five things to check before a long car journey, with reasons.",
        "1. Tyre pressure and tread, because worn or underinflated tyres reduce "
        "grip and waste fuel.\n"
        "2. Oil and coolant levels, to protect the engine from damage or "
        "overheating.\n"
        "3. Lights and indicators, so other drivers can see you and understand "
        "your intentions.\n"
        "4. Windscreen washer fluid, since a dirty windscreen can badly limit "
        "visibility.\n"
        "5. Your route and rest stops, so you can take breaks and avoid driving "
        "while tired.",
    ),
    (
        "list-017",
        "Give four reasons to keep a journal.",
        "1. Writing down your thoughts helps you understand your feelings and "
        "untangle worries.\n"
        "2. It creates a record of your life that is fun, and often surprising, to "
        "reread years later.\n"
        "3. Regular writing improves how clearly you express yourself.\n"
        "4. Noting goals and progress makes it easier to spot patterns and stay "
        "motivated.",
    ),
    (
        "list-018",
        "List three cheap ways to make a small flat feel bigger, with one reason "
        "each.",
        "1. Hang a large mirror opposite a window, which reflects light and "
        "creates a sense of depth.\n"
        "2. Choose light wall colours, since pale shades make walls seem to "
        "recede.\n"
        "3. Clear the floor with wall shelves and under-bed storage, because "
        "visible floor space makes a room feel more open.",
    ),
    (
        "list-019",
        "Name five vegetables that are easy to grow at home and say why.",
        "1. Lettuce, which grows quickly and can be picked leaf by leaf for "
        "weeks.\n"
        "2. Radishes, which are ready to harvest in about four weeks, perfect for "
        "impatient gardeners.\n"
        "3. Courgettes, because a single plant produces a generous crop all "
        "summer.\n"
        "4. Runner beans, which climb up canes and keep cropping the more you pick "
        "them.\n"
        "5. Cherry tomatoes, which are happy in pots on a sunny balcony and far "
        "tastier than shop-bought ones.",
    ),
    (
        "list-020",
        "List four ways to stay focused while studying, with a reason for each.",
        "1. Put your phone in another room, since even a silent phone nearby can "
        "pull at your attention.\n"
        "2. Work in short blocks, such as 25 minutes followed by a 5-minute break, "
        "to keep your mind fresh.\n"
        "3. Set one clear goal for each session, so you know exactly what finished "
        "looks like.\n"
        "4. Study in the same quiet place each time, which helps your brain switch "
        "into work mode.",
    ),
    (
        "list-021",
        "Give three reasons why bees are important.",
        "1. They pollinate many of the crops we eat, including apples, almonds and "
        "berries.\n"
        "2. They pollinate wild plants too, which in turn provide food and shelter "
        "for birds and other animals.\n"
        "3. Honeybees produce honey and beeswax, which people have used for food, "
        "medicine and candles for thousands of years.",
    ),
    (
        "list-022",
        "List five questions to ask at the end of a job interview, with why each "
        "is useful.",
        "1. What does a typical day look like in this role? It shows what the job "
        "really involves.\n"
        "2. How is success measured in the first six months? This reveals the "
        "employer's expectations.\n"
        "3. What do you enjoy most about working here? The answer gives a feel for "
        "the culture.\n"
        "4. What are the biggest challenges facing the team? It shows you are "
        "already thinking ahead.\n"
        "5. What are the next steps in the process? You will know when to expect a "
        "decision.",
    ),
    (
        "list-023",
        "Name four kitchen tools every beginner cook should own, with one reason "
        "each.",
        "1. A sharp chef's knife, because most recipes start with chopping, and a "
        "sharp blade is safer than a blunt one.\n"
        "2. A large chopping board, giving you room to work without food spilling "
        "over the edges.\n"
        "3. A heavy frying pan, which heats evenly for everything from eggs to "
        "stir-fries.\n"
        "4. A medium saucepan with a lid, useful for pasta, rice, soups and sauces.",
    ),
    (
        "list-024",
        "List three ways to travel in a more environmentally friendly way.",
        "1. Take trains or coaches instead of short flights where possible, since "
        "they produce far less carbon per passenger.\n"
        "2. Pack light, because less weight means less fuel burned for every "
        "kilometre you travel.\n"
        "3. Eat at local restaurants and buy local products, which supports the "
        "community and avoids food shipped from far away.",
    ),
    (
        "list-025",
        "Give five tips for a good video call, with a reason each.",
        "1. Face a window or lamp, so your face is evenly lit rather than in "
        "shadow.\n"
        "2. Put the camera at eye level, which feels more natural to the people "
        "watching.\n"
        "3. Use headphones with a microphone, to cut echo and background noise.\n"
        "4. Mute yourself when you are not speaking, so small household noises do "
        "not distract others.\n"
        "5. Test your setup a few minutes early, so technical problems do not eat "
        "into the meeting.",
    ),
    (
        "list-026",
        "List four common birds you might see in a European city park, with a tip "
        "for recognising each.",
        "1. Feral pigeon: a plump grey bird with a shimmering green and purple "
        "neck.\n"
        "2. Blackbird: the male is all black with a bright orange-yellow beak, "
        "while the female is brown.\n"
        "3. Robin: small and round, with an orange-red face and breast.\n"
        "4. Magpie: a long-tailed black and white bird with a loud, chattering "
        "call.",
    ),
    (
        "list-027",
        "Name three benefits of learning to play a musical instrument.",
        "1. It trains memory and concentration, since you have to read, listen and "
        "move at the same time.\n"
        "2. It offers a healthy way to relax and express emotions after a busy "
        "day.\n"
        "3. It creates chances to connect with others, through bands, choirs or "
        "simply playing for friends.",
    ),
    (
        "list-028",
        "List five things to pack for a day hike, with a reason for each.",
        "1. Plenty of water, because dehydration can set in fast on warm or steep "
        "trails.\n"
        "2. A waterproof jacket, as the weather in the hills can change quickly.\n"
        "3. Snacks such as nuts or fruit, to keep your energy up.\n"
        "4. A map or downloaded route, in case your phone loses signal.\n"
        "5. Sun cream and a hat, since you may be exposed to the sun for hours.",
    ),
    (
        "list-029",
        "Give four reasons to read fiction.",
        "1. Stories let you see the world through other people's eyes, which "
        "builds empathy.\n"
        "2. Reading novels expands your vocabulary naturally, without feeling like "
        "study.\n"
        "3. Following a plot and its characters over many pages exercises "
        "concentration.\n"
        "4. A good book is a simple, screen-free way to relax and escape for a "
        "while.",
    ),
    (
        "list-030",
        "List three tips for keeping a conversation going with someone you have "
        "just met.",
        "1. Ask open questions that start with how or what, since they invite "
        "longer answers than yes-or-no questions.\n"
        "2. Listen for details in their replies and ask about them, which shows "
        "genuine interest.\n"
        "3. Share a little about yourself in return, so the conversation feels "
        "like an exchange rather than an interview.",
    ),
    (
        "list-031",
        "Name five simple ways to use less energy at home, with a reason each.",
        "1. Switch to LED bulbs, which use far less electricity than old-style "
        "bulbs and last much longer.\n"
        "2. Turn the thermostat down by one degree, a small change that noticeably "
        "cuts heating bills.\n"
        "3. Wash clothes at 30 degrees, since heating the water accounts for most "
        "of a washing machine's energy use.\n"
        "4. Switch devices off at the wall rather than leaving them on standby, "
        "because standby power adds up over a year.\n"
        "5. Seal draughts around doors and windows, so warm air stays inside.",
    ),
    (
        "list-032",
        "List four qualities of a good team leader, with a sentence on each.",
        "1. Clear communication: the team should always know the goals and what is "
        "expected of them.\n"
        "2. Fairness, because people work better when they trust they will be "
        "treated equally.\n"
        "3. Willingness to listen, since the best ideas often come from the people "
        "doing the work.\n"
        "4. Calm under pressure, which helps the whole team stay steady when "
        "problems arise.",
    ),
    (
        "list-033",
        "Give three reasons why drinking enough water matters.",
        "1. Water helps regulate body temperature, mainly through sweating.\n"
        "2. It carries nutrients to cells and helps the kidneys flush out waste.\n"
        "3. Even mild dehydration can cause headaches, tiredness and poor "
        "concentration, so staying hydrated keeps you feeling sharp.",
    ),
    (
        "list-034",
        "List five classic novels worth reading and say briefly why.",
        "1. Pride and Prejudice by Jane Austen, for its sharp wit and memorable "
        "characters.\n"
        "2. Frankenstein by Mary Shelley, an early science fiction story that "
        "still raises hard questions about creation and responsibility.\n"
        "3. Great Expectations by Charles Dickens, a gripping tale of ambition, "
        "guilt and growing up.\n"
        "4. Jane Eyre by Charlotte Brontë, for its fiercely independent heroine.\n"
        "5. Nineteen Eighty-Four by George Orwell, a chilling warning about "
        "surveillance and control.",
    ),
    (
        "list-035",
        "Name four ways to make a presentation more engaging.",
        "1. Open with a story or a surprising fact, which grabs attention in the "
        "first minute.\n"
        "2. Use slides with images and few words, so the audience listens to you "
        "rather than reading.\n"
        "3. Ask the audience a question, which turns passive listeners into "
        "participants.\n"
        "4. Practise out loud beforehand, because confident delivery keeps people "
        "interested.",
    ),
    (
        "list-036",
        "List three reasons to back up your computer files regularly.",
        "1. Hard drives and laptops can fail without warning, and a backup means "
        "nothing important is lost.\n"
        "2. Ransomware and other malware can lock or delete files, but a recent "
        "backup lets you restore them.\n"
        "3. Accidents happen, from spilled coffee to deleting the wrong folder, "
        "and backups let you recover.",
    ),
    (
        "list-037",
        "Give five tips for saving up for a big purchase.",
        "1. Set a clear target amount and date, so you know how much to save each "
        "month.\n"
        "2. Open a separate savings account, which keeps the money out of easy "
        "reach.\n"
        "3. Set up an automatic transfer on payday, so saving happens before you "
        "can spend.\n"
        "4. Cut one regular expense, like a subscription you rarely use, and "
        "redirect that money.\n"
        "5. Track your progress visually, because watching the total grow keeps "
        "you motivated.",
    ),
    (
        "list-038",
        "List four signs that a shopping website might be a scam, with a short "
        "explanation each.",
        "1. Prices that are far too good to be true, a common lure to collect "
        "payment details.\n"
        "2. A web address that is misspelled or slightly different from the real "
        "brand's site, designed to fool you at a glance.\n"
        "3. No clear contact details, physical address or returns policy, which "
        "makes it hard to get help or a refund.\n"
        "4. Pressure to pay quickly by bank transfer or gift card, methods that "
        "are hard to trace or reverse.",
    ),
    (
        "list-039",
        "Name three simple stretches for people who sit at a desk all day, and "
        "what each helps with.",
        "1. Neck tilts: slowly lower each ear toward its shoulder to ease "
        "stiffness from looking at a screen.\n"
        "2. Shoulder rolls: roll your shoulders backwards ten times to loosen "
        "tension in the upper back.\n"
        "3. Seated hip stretch: rest one ankle on the opposite knee and lean "
        "gently forward to relieve hips that are tight from long sitting.",
    ),
    (
        "list-040",
        "List five habits for keeping a home tidy, with a reason each.",
        "1. Make your bed each morning, a quick task that makes the whole room "
        "look neater.\n"
        "2. Wash dishes straight after meals, so they never pile up into a big "
        "job.\n"
        "3. Give everything a home, which makes putting things away automatic.\n"
        "4. Spend ten minutes tidying each evening, stopping clutter from building "
        "up.\n"
        "5. Deal with post as soon as it arrives, so papers never stack up on "
        "surfaces.",
    ),
]

# Simple reasoning: arithmetic word problems, ordering, logic, with worked answers.
REASONING: list[Record] = [
    (
        "reas-001",
        "A baker makes 48 muffins and packs them in boxes of 6. She sells 5 boxes. "
        "How many muffins are left?",
        "First find the number of boxes: 48 divided by 6 is 8 boxes. She sells 5 "
        "boxes, so 8 minus 5 leaves 3 boxes. Each box holds 6 muffins, so 3 times "
        "6 equals 18. She has 18 muffins left.",
    ),
    (
        "reas-002",
        "Tom is taller than Ana. Ana is taller than Ben. Ben is taller than Cara. "
        "Who is the second shortest?",
        "Put them in order from tallest to shortest. Tom is taller than Ana, Ana "
        "is taller than Ben, and Ben is taller than Cara, so the order is Tom, "
        "Ana, Ben, Cara. Cara is the shortest, which makes Ben the second shortest.",
    ),
    (
        "reas-003",
        "A train leaves at 9:45 and the journey takes 2 hours and 35 minutes. What "
        "time does it arrive?",
        "Add the hours first: 9:45 plus 2 hours is 11:45. Then add the 35 minutes "
        "in two steps: 15 minutes takes it to 12:00, and the remaining 20 minutes "
        "takes it to 12:20. The train arrives at 12:20.",
    ),
    (
        "reas-004",
        "A shirt costs 40 dollars and is discounted by 25 percent. What is the "
        "sale price?",
        "25 percent is one quarter, and a quarter of 40 is 10, so the discount is "
        "10 dollars. Subtract the discount from the original price: 40 minus 10 "
        "equals 30. The sale price is 30 dollars.",
    ),
    (
        "reas-005",
        "I have 7 coins, each worth either 2 cents or 5 cents, and together they "
        "are worth 26 cents. How many of each coin do I have?",
        "Let x be the number of 5-cent coins, so there are 7 - x two-cent coins. "
        "The total value is 5x + 2(7 - x) = 26, which simplifies to 3x + 14 = 26, "
        "so 3x = 12 and x = 4. That means 4 five-cent coins and 3 two-cent coins. "
        "Check: 20 + 6 = 26 cents, using 7 coins.",
    ),
    (
        "reas-006",
        "What is the next number in the sequence 2, 6, 12, 20, 30?",
        "Look at the gaps between terms: 4, 6, 8, 10. Each gap grows by 2, so the "
        "next gap is 12, and 30 + 12 = 42. Another way to see it: the terms are 1 "
        "x 2, 2 x 3, 3 x 4, 4 x 5 and 5 x 6, so the next is 6 x 7 = 42.",
    ),
    (
        "reas-007",
        "A rectangle has a perimeter of 30 cm, and its length is twice its width. "
        "What is its area?",
        "Call the width w, so the length is 2w. The perimeter is 2 x (w + 2w) = "
        "6w. Setting 6w = 30 gives w = 5 cm, so the length is 10 cm. The area is "
        "length times width: 10 x 5 = 50 square centimetres.",
    ),
    (
        "reas-008",
        "Three friends share a bill of 54 pounds. Mia pays twice as much as Jo, "
        "and Jo pays the same as Sam. How much does each person pay?",
        "Let Jo pay x. Sam also pays x, and Mia pays 2x. Together that is x + x + "
        "2x = 4x = 54, so x = 13.50. Jo pays 13.50 pounds, Sam pays 13.50 pounds "
        "and Mia pays 27 pounds. Check: 13.50 + 13.50 + 27 = 54.",
    ),
    (
        "reas-009",
        "All roses in the garden are red. Some of the red flowers in the garden "
        "are tulips. Can we conclude that some roses are tulips?",
        "No. The first statement says every rose belongs to the group of red "
        "flowers. The second says some tulips also belong to that group. But two "
        "kinds of thing sharing a group does not mean they overlap with each "
        "other: the red flowers could be a mix of roses and tulips with no flower "
        "being both. So the conclusion does not follow.",
    ),
    (
        "reas-010",
        "If 5 machines make 5 widgets in 5 minutes, how long would 100 machines "
        "take to make 100 widgets?",
        "Since 5 machines make 5 widgets in 5 minutes, each machine makes one "
        "widget in 5 minutes. With 100 machines working at the same time, each one "
        "makes its own widget at that rate, so all 100 widgets are finished in the "
        "same 5 minutes. The answer is 5 minutes, not 100.",
    ),
    (
        "reas-011",
        "A car travels 180 km in 2 hours and 15 minutes. What is its average speed?",
        "Convert the time to hours: 15 minutes is 0.25 hours, so the total is 2.25 "
        "hours. Average speed is distance divided by time, which is 180 divided by "
        "2.25. Since 2.25 x 80 = 180, the average speed is 80 km per hour.",
    ),
    (
        "reas-012",
        "Sort these numbers from smallest to largest: 0.5, 3/8, 2/5, 0.45.",
        "Convert everything to decimals: 3/8 = 0.375 and 2/5 = 0.4, while the "
        "others are already 0.45 and 0.5. In increasing order that gives 0.375, "
        "0.4, 0.45, 0.5. So the order is 3/8, 2/5, 0.45, 0.5.",
    ),
    (
        "reas-013",
        "Anna is 3 times as old as her son. In 12 years she will be twice as old "
        "as him. How old are they now?",
        "Let the son's age be s, so Anna is 3s. In 12 years, 3s + 12 = 2(s + 12). "
        "Expanding gives 3s + 12 = 2s + 24, so s = 12. The son is 12 and Anna is "
        "36. Check: in 12 years they will be 24 and 48, and 48 is twice 24.",
    ),
    (
        "reas-014",
        "A farmer has only chickens and cows. Together they have 20 heads and 56 "
        "legs. How many of each animal are there?",
        "If all 20 animals were chickens, there would be 40 legs. There are 56, "
        "which is 16 extra legs. Each cow has 2 more legs than a chicken, so there "
        "are 16 / 2 = 8 cows, leaving 20 - 8 = 12 chickens. Check: 8 x 4 + 12 x 2 "
        "= 32 + 24 = 56 legs.",
    ),
    (
        "reas-015",
        "Which is the odd one out: 9, 16, 25, 30, 36? Explain your answer.",
        "30 is the odd one out. The numbers 9, 16, 25 and 36 are all perfect "
        "squares: 3 squared, 4 squared, 5 squared and 6 squared. 30 is not the "
        "square of any whole number, since it falls between 25 and 36.",
    ),
    (
        "reas-016",
        "A recipe needs 300 g of flour to serve 4 people. How much flour is needed "
        "for 10 people?",
        "First find the amount per person: 300 g divided by 4 is 75 g. Then "
        "multiply by the number of people: 75 x 10 = 750 g. You need 750 grams of "
        "flour for 10 people.",
    ),
    (
        "reas-017",
        "Three boxes are labelled Apples, Oranges and Mixed, but every label is "
        "wrong. You may take out one fruit from one box without looking inside. "
        "How can you relabel all the boxes correctly?",
        "Take a fruit from the box labelled Mixed. Its label is wrong, so it holds "
        "only one type of fruit. Suppose you pull out an apple: that box is "
        "Apples. The box labelled Oranges cannot hold oranges, and the apples are "
        "already accounted for, so it must be Mixed. The last box, labelled "
        "Apples, must therefore be Oranges. If you pull out an orange instead, the "
        "same reasoning works with the fruits swapped.",
    ),
    (
        "reas-018",
        "Jake reads 15 pages every day. His book has 320 pages. How many days will "
        "it take him to finish it?",
        "Divide the total pages by the pages per day: 320 / 15 is about 21.3. "
        "After 21 days he has read 21 x 15 = 315 pages, leaving 5 pages still to "
        "read. He needs a 22nd day for those, so it takes him 22 days to finish "
        "the book.",
    ),
    (
        "reas-019",
        "If today is Wednesday, what day of the week will it be 100 days from now?",
        "The days of the week repeat every 7 days, so find the remainder when 100 "
        "is divided by 7. Since 7 x 14 = 98, the remainder is 2. So 100 days from "
        "now falls on the same weekday as 2 days from now. Two days after "
        "Wednesday is Friday.",
    ),
    (
        "reas-020",
        "Five runners finish a race. Priya finishes after Omar but before Leon. "
        "Sofia finishes immediately after Omar. Kai finishes last. What is the "
        "finishing order?",
        "Kai is last, so he is fifth. Priya comes after Omar, Leon comes after "
        "Priya, and Sofia comes directly after Omar, so all three finish behind "
        "Omar. That means Omar must be first, with Sofia straight after him in "
        "second. Priya and Leon fill third and fourth, with Priya ahead of Leon. "
        "The order is Omar, Sofia, Priya, Leon, Kai.",
    ),
    (
        "reas-021",
        "A shop sells pencils at 3 for 1 dollar. How much do 24 pencils cost?",
        "Split the 24 pencils into groups of three: 24 / 3 = 8 groups. Each group "
        "costs 1 dollar, so 24 pencils cost 8 dollars. That works out to about 33 "
        "cents per pencil.",
    ),
    (
        "reas-022",
        "It takes 6 minutes to boil 3 eggs together in one pan. How long does it "
        "take to boil 6 eggs together in a larger pan?",
        "Eggs boiling in the same pan cook at the same time, not one after "
        "another. The cooking time depends on how firm you want them, not on how "
        "many there are. So 6 eggs in a pan big enough to hold them still take "
        "about 6 minutes, although the water may take a little longer to come back "
        "to the boil after you add them.",
    ),
    (
        "reas-023",
        "A water tank holds 500 litres and is 40 percent full. How many more "
        "litres are needed to fill it?",
        "40 percent of 500 litres is 0.4 x 500 = 200 litres, which is what the "
        "tank holds now. To fill it you need 500 - 200 = 300 more litres. Another "
        "way to see it: the tank is 60 percent empty, and 60 percent of 500 is 300.",
    ),
    (
        "reas-024",
        "If it rains, the match is cancelled. The match was not cancelled. What "
        "can you conclude?",
        "You can conclude that it did not rain. The rule says rain always leads to "
        "cancellation, so if it had rained the match would have been cancelled. It "
        "was not cancelled, so it cannot have rained. Note that the reverse does "
        "not work: a cancelled match would not prove that it rained, because "
        "matches can be cancelled for other reasons.",
    ),
    (
        "reas-025",
        "What is 15 percent of 260? Show a quick way to work it out.",
        "10 percent of 260 is 26, found by dividing by 10. 5 percent is half of "
        "that, which is 13. Adding them gives 15 percent: 26 + 13 = 39. So 15 "
        "percent of 260 is 39.",
    ),
    (
        "reas-026",
        "Lena has twice as many stickers as Theo. Together they have 45. How many "
        "stickers does each of them have?",
        "Let Theo have t stickers, so Lena has 2t. Together t + 2t = 3t = 45, so t "
        "= 15. Theo has 15 stickers and Lena has 30. Check: 15 + 30 = 45, and 30 "
        "is twice 15.",
    ),
    (
        "reas-027",
        "What is the angle between the hour and minute hands of a clock at 3:00? "
        "What about at 3:30?",
        "A clock face is 360 degrees split into 12 hour marks, so the marks are 30 "
        "degrees apart. At 3:00 the minute hand points at 12 and the hour hand at "
        "3, so the angle is 3 x 30 = 90 degrees. At 3:30 the minute hand points at "
        "6, while the hour hand has moved halfway from 3 to 4. The gap is 6 - 3.5 "
        "= 2.5 marks, so the angle is 2.5 x 30 = 75 degrees.",
    ),
    (
        "reas-028",
        "Put these steps for making a cup of tea in a sensible order: pour water "
        "over the tea bag, boil the kettle, remove the tea bag, fill the kettle, "
        "add milk.",
        "You need water before you can boil it, and boiled water before you can "
        "brew, so start by filling the kettle and then boil it. Next, pour the hot "
        "water over the tea bag and let it steep, then remove the tea bag, and "
        "finally add milk to taste. The order is: fill the kettle, boil the "
        "kettle, pour water over the tea bag, remove the tea bag, add milk.",
    ),
    (
        "reas-029",
        "A bag holds 4 red balls and 6 blue balls. If you pick one at random, what "
        "is the probability that it is red?",
        "There are 4 + 6 = 10 balls in total, and 4 of them are red. The "
        "probability of picking red is the number of red balls divided by the "
        "total number of balls: 4/10, which simplifies to 2/5, or 40 percent.",
    ),
    (
        "reas-030",
        "Alice, Ben and Chloe each own exactly one pet: a cat, a dog or a fish. "
        "Alice is allergic to fur. Ben's pet barks. Who owns which pet?",
        "Ben's pet barks, so Ben owns the dog. Alice is allergic to fur, so she "
        "cannot own the cat or the dog, which leaves her with the fish. That means "
        "Chloe owns the cat. Final answer: Alice has the fish, Ben has the dog and "
        "Chloe has the cat.",
    ),
    (
        "reas-031",
        "A phone plan costs 12 dollars a month plus 5 cents per text message. One "
        "month the bill is 15.40 dollars. How many texts were sent?",
        "Subtract the fixed monthly charge first: 15.40 - 12.00 = 3.40 dollars "
        "spent on texts. Each text costs 0.05 dollars, so the number of texts is "
        "3.40 / 0.05 = 68. That month, 68 texts were sent.",
    ),
    (
        "reas-032",
        "Is 91 a prime number? Explain how you know.",
        "No, 91 is not prime. A prime has exactly two factors, 1 and itself. "
        "Testing small primes: 91 is odd, so it is not divisible by 2; its digits "
        "add up to 10, so it is not divisible by 3; it does not end in 0 or 5, so "
        "it is not divisible by 5. But 7 x 13 = 91, so it has factors other than 1 "
        "and 91.",
    ),
    (
        "reas-033",
        "Sam walks 3 km north and then 4 km east. How far is he from his starting "
        "point in a straight line?",
        "His path forms a right-angled triangle with sides of 3 km and 4 km. By "
        "Pythagoras' theorem, the straight-line distance squared equals 3 squared "
        "plus 4 squared, which is 9 + 16 = 25. The square root of 25 is 5, so Sam "
        "is 5 km from where he started.",
    ),
    (
        "reas-034",
        "A school trip needs to take 130 students by bus, and each bus holds 40 "
        "students. How many buses are needed?",
        "130 divided by 40 is 3.25. Three buses carry only 120 students, leaving "
        "10 without a seat, so a fourth bus is needed. In problems like this you "
        "always round up, because you cannot hire part of a bus. The answer is 4 "
        "buses.",
    ),
    (
        "reas-035",
        "What letter comes next in J, F, M, A, M, J? Explain the pattern.",
        "The letters are the first letters of the months of the year in order: "
        "January, February, March, April, May, June. The next month is July, so "
        "the next letter is J. After that would come A for August and S for "
        "September.",
    ),
    (
        "reas-036",
        "A jacket's price goes up by 10 percent and then down by 10 percent. Is it "
        "back to its original price?",
        "No, it ends up slightly cheaper. Suppose it starts at 100 pounds. A 10 "
        "percent rise makes it 110. The 10 percent fall is then taken from 110, "
        "which is 11, leaving 99 pounds. Because the second percentage is worked "
        "out on a larger number, the drop is bigger than the rise, and the final "
        "price is 1 percent below the start.",
    ),
    (
        "reas-037",
        "Every student in the class passed the test. Maria did not pass the test. "
        "What can we say about Maria?",
        "Maria is not a student in that class. If she were, she would have passed, "
        "because every student in the class passed. Since she did not pass, she "
        "must be outside that group. We cannot tell anything more, such as which "
        "class she is in or why she did not pass.",
    ),
    (
        "reas-038",
        "A film starts at 7:40 pm and lasts 1 hour 55 minutes. Will it finish "
        "before 9:30 pm?",
        "Add 1 hour to 7:40 to get 8:40. Then add the 55 minutes: 20 minutes takes "
        "it to 9:00, and the remaining 35 minutes makes it 9:35 pm. The film ends "
        "at 9:35, so it finishes five minutes after 9:30, not before.",
    ),
    (
        "reas-039",
        "You have a 3-litre jug, a 5-litre jug and an unlimited supply of water. "
        "How can you measure exactly 4 litres?",
        "Fill the 5-litre jug, then pour from it into the 3-litre jug until that "
        "is full, which leaves 2 litres in the 5-litre jug. Empty the 3-litre jug "
        "and pour the 2 litres into it. Fill the 5-litre jug again, then use it to "
        "top up the 3-litre jug, which takes just 1 more litre. The 5-litre jug "
        "now holds exactly 4 litres.",
    ),
    (
        "reas-040",
        "The average of four numbers is 12. Three of them are 10, 15 and 9. What "
        "is the fourth number?",
        "If the average of four numbers is 12, their total is 4 x 12 = 48. The "
        "three known numbers add up to 10 + 15 + 9 = 34. The fourth number is the "
        "difference: 48 - 34 = 14. Check: (10 + 15 + 9 + 14) / 4 = 48 / 4 = 12.",
    ),
]

# Rewriting: rephrase, simplify or summarise text given in the prompt.
REWRITING: list[Record] = [
    (
        "rewr-001",
        "Simplify this sentence for a young reader:\n"
        "\n"
        "The precipitation that occurred throughout the duration of the afternoon "
        "resulted in the postponement of the outdoor sporting event.",
        "It rained all afternoon, so the outdoor sports game was moved to another "
        "day.\n"
        "\n"
        "I swapped long words like precipitation and postponement for everyday "
        "ones such as rained and moved.",
    ),
    (
        "rewr-002",
        "Rewrite this message in a more formal tone:\n"
        "\n"
        "Hey, we can't make it to the thing on Friday, something came up, sorry!",
        "I am sorry to let you know that we will no longer be able to attend the "
        "event on Friday, as an unexpected matter has come up. Please accept our "
        "apologies for any inconvenience.",
    ),
    (
        "rewr-003",
        "Summarise this in one sentence:\n"
        "\n"
        "The town council met on Tuesday evening to discuss the state of the local "
        "park. Residents complained that the playground equipment was old and "
        "unsafe, and that the paths flooded after heavy rain. After a long debate, "
        "the council agreed to spend part of next year's budget on new equipment "
        "and better drainage.",
        "After residents complained about unsafe playground equipment and flooded "
        "paths, the town council agreed on Tuesday to use part of next year's "
        "budget for new equipment and better drainage in the local park.",
    ),
    (
        "rewr-004",
        "Make this sentence more concise:\n"
        "\n"
        "In my personal opinion, I think that we should probably consider the "
        "possibility of starting the meeting at an earlier time in the day.",
        "I think we should consider starting the meeting earlier.\n"
        "\n"
        "This version removes repetition: in my personal opinion and I think say "
        "the same thing, and phrases like the possibility of and at an earlier "
        "time in the day add words without adding meaning.",
    ),
    (
        "rewr-005",
        "Rewrite this in the active voice:\n"
        "\n"
        "The cake was eaten by the children before the guests had even arrived.",
        "The children ate the cake before the guests had even arrived.\n"
        "\n"
        "In the active version, the people doing the action, the children, come "
        "first as the subject, which makes the sentence shorter and more direct.",
    ),
    (
        "rewr-006",
        "Rephrase this so it sounds more positive:\n"
        "\n"
        "You can't leave the building until you've finished the safety training.",
        "Once you have finished the safety training, you will be free to leave the "
        "building.\n"
        "\n"
        "This version focuses on what the person can do rather than on what they "
        "are not allowed to do, while keeping exactly the same meaning.",
    ),
    (
        "rewr-007",
        "Put this into words a general audience would understand:\n"
        "\n"
        "The patient presented with acute abdominal pain and was subsequently "
        "admitted for observation.",
        "The patient arrived with sudden, severe stomach pain and was then kept in "
        "hospital so doctors could keep an eye on them.\n"
        "\n"
        "Here, acute means sudden and severe, and presented with simply means "
        "arrived showing.",
    ),
    (
        "rewr-008",
        "Summarise this paragraph in one sentence:\n"
        "\n"
        "Many people assume that goldfish have a memory of only three seconds. In "
        "fact, experiments have shown that goldfish can remember things for "
        "months. They can be trained to respond to sounds and colours, and even to "
        "push levers to get food.",
        "Contrary to the popular three-second myth, goldfish can remember things "
        "for months and can be trained to respond to sounds and colours or to push "
        "levers for food.",
    ),
    (
        "rewr-009",
        "Rewrite this request so it is more polite:\n"
        "\n"
        "Send me the report by tomorrow.",
        "Could you please send me the report by tomorrow? Thank you very much for "
        "your help.\n"
        "\n"
        "If you want an even softer tone, you could write: Would it be possible to "
        "have the report by tomorrow?",
    ),
    (
        "rewr-010",
        "Turn this into plain English:\n"
        "\n"
        "Pursuant to the terms of the agreement, the lessee shall remit payment no "
        "later than the first day of each calendar month.",
        "Under the agreement, the tenant must pay by the first day of every "
        "month.\n"
        "\n"
        "Pursuant to means under or according to, the lessee is the person "
        "renting, and remit payment simply means pay.",
    ),
    (
        "rewr-011",
        "Rewrite this sentence in the past tense:\n"
        "\n"
        "She walks to the station, buys a coffee and catches the 8:15 train.",
        "She walked to the station, bought a coffee and caught the 8:15 train.\n"
        "\n"
        "All three verbs change: walks becomes walked, while buys and catches are "
        "irregular verbs and become bought and caught.",
    ),
    (
        "rewr-012",
        "Summarise this announcement in one short sentence:\n"
        "\n"
        "Our company is pleased to announce that, following months of careful "
        "planning and consultation with staff, we will be moving to a new, larger "
        "office in the city centre in the spring, which will give teams more space "
        "and better transport links.",
        "After months of planning, the company will move to a larger city-centre "
        "office in the spring, giving teams more space and better transport links.",
    ),
    (
        "rewr-013",
        "Rewrite this sentence so a ten-year-old can understand it:\n"
        "\n"
        "Deforestation contributes significantly to climate change because trees "
        "absorb carbon dioxide.",
        "Trees soak up a gas called carbon dioxide, which traps heat and warms the "
        "planet. When lots of forests are cut down, fewer trees are left to soak "
        "it up, so the Earth gets warmer.",
    ),
    (
        "rewr-014",
        "Make this product description more exciting:\n"
        "\n"
        "This backpack has several pockets and is waterproof.",
        "Rain or shine, this waterproof backpack keeps your gear dry, and with "
        "pockets for everything from your laptop to your keys, you will always "
        "know exactly where things are. Ready for your next adventure?",
    ),
    (
        "rewr-015",
        "Rephrase this sentence so it no longer uses the word very:\n"
        "\n"
        "The film was very long and very boring, but the music was very good.",
        "The film was overlong and tedious, but the music was superb.\n"
        "\n"
        "Swapping very plus a weak adjective for one precise word, such as tedious "
        "or superb, makes the sentence tighter and more vivid.",
    ),
    (
        "rewr-016",
        "Summarise this in one sentence:\n"
        "\n"
        "Regular exercise has many benefits. It strengthens the heart, helps "
        "control weight, and improves sleep. It can also reduce stress and "
        "anxiety, and studies link it to a lower risk of several long-term "
        "illnesses.",
        "Regular exercise strengthens the heart, helps with weight control and "
        "sleep, eases stress and anxiety, and is linked to a lower risk of several "
        "long-term illnesses.",
    ),
    (
        "rewr-017",
        "Rewrite this sentence without the business jargon:\n"
        "\n"
        "We need to leverage our synergies to move the needle on customer "
        "engagement going forward.",
        "From now on, we need to combine our strengths to get customers noticeably "
        "more interested in what we offer.\n"
        "\n"
        "Leverage our synergies means combine our strengths, move the needle means "
        "make a noticeable difference, and going forward means from now on.",
    ),
    (
        "rewr-018",
        "Rephrase this in a friendlier tone:\n"
        "\n"
        "Your request has been received and will be processed in due course.",
        "Thanks so much for getting in touch! We have received your request and "
        "will get back to you as soon as we can. If you have any questions in the "
        "meantime, just reply to this message.",
    ),
    (
        "rewr-019",
        "Combine these into a single sentence:\n"
        "\n"
        "The museum opened in 1902. It holds over ten thousand objects. Most of "
        "them come from local families.",
        "Opened in 1902, the museum holds over ten thousand objects, most of which "
        "come from local families.\n"
        "\n"
        "Turning the first sentence into an opening phrase and using most of which "
        "avoids repeating the subject three times.",
    ),
    (
        "rewr-020",
        "Simplify this sentence:\n"
        "\n"
        "Notwithstanding the inclement weather conditions, attendance at the "
        "festival exceeded all prior expectations.",
        "Even though the weather was bad, far more people came to the festival "
        "than anyone had expected.\n"
        "\n"
        "Notwithstanding means despite, and inclement weather simply means bad "
        "weather.",
    ),
    (
        "rewr-021",
        "Rewrite this complaint so it is calm and constructive:\n"
        "\n"
        "This is the third time my order has been wrong and I'm sick of it. Your "
        "service is useless.",
        "Unfortunately, this is the third time my order has been incorrect, which "
        "is frustrating. Could you please look into what is going wrong and let me "
        "know how it will be put right? I would like to keep ordering from you, so "
        "I hope we can sort this out.",
    ),
    (
        "rewr-022",
        "Summarise this conversation in one sentence:\n"
        "\n"
        "Mum: Did you finish your homework?\n"
        "Leo: Almost, I just have the maths left.\n"
        "Mum: Okay, finish that before you play any games.\n"
        "Leo: Fine, I'll do it now.",
        "Leo tells his mum that only his maths homework is left, and when she says "
        "he must finish it before playing games, he agrees to do it straight away.",
    ),
    (
        "rewr-023",
        "Make this sentence gender-neutral:\n"
        "\n"
        "Every employee should bring his ID card to the meeting.",
        "All employees should bring their ID cards to the meeting.\n"
        "\n"
        "Another option is: Every employee should bring their ID card to the "
        "meeting. Both versions include everyone without assuming a gender.",
    ),
    (
        "rewr-024",
        "Rewrite this statement as a question:\n"
        "\n"
        "The library closes at eight on weekdays.",
        "Does the library close at eight on weekdays?\n"
        "\n"
        "If you want to ask for the information rather than confirm it, you could "
        "say: What time does the library close on weekdays?",
    ),
    (
        "rewr-025",
        "Summarise this news item in one sentence:\n"
        "\n"
        "Scientists studying a lake in the mountains found that its water level "
        "had dropped by two metres in ten years. They believe the main causes are "
        "lower snowfall in winter and higher summer temperatures, which increase "
        "evaporation. They warn the lake could shrink further unless conditions "
        "change.",
        "A mountain lake has dropped two metres in ten years, mainly because of "
        "less winter snow and hotter summers, and scientists warn it may keep "
        "shrinking.",
    ),
    (
        "rewr-026",
        "Rewrite this sentence so it is no longer ambiguous:\n"
        "\n"
        "The manager told the assistant that she would need to finish the report "
        "before she left.",
        "The original is unclear because she could mean either the manager or the "
        "assistant. If the assistant has to do it, write: The manager told the "
        "assistant to finish the report before leaving. If the manager meant "
        "herself, write: The manager said she would finish the report herself "
        "before she left.",
    ),
    (
        "rewr-027",
        "Paraphrase this proverb in plain words:\n"
        "\n"
        "Don't count your chickens before they hatch.",
        "Do not rely on something good happening until it actually has. Plans and "
        "hopes can fall through, so it is wiser to wait for a result before "
        "celebrating or spending money you do not have yet.",
    ),
    (
        "rewr-028",
        "Shorten this sentence to under ten words:\n"
        "\n"
        "Due to the fact that the road is currently closed for repairs, all buses "
        "will be taking an alternative route until further notice.",
        "Road closed for repairs: buses diverted until further notice.\n"
        "\n"
        "This keeps the key facts, the closure, the reason and the diversion, "
        "while cutting filler such as due to the fact that.",
    ),
    (
        "rewr-029",
        "Rewrite this text message as a sentence for a formal email:\n"
        "\n"
        "gonna be late 2mrw, dentist at 9, back by 11 prob",
        "Please note that I will be arriving late tomorrow, as I have a dental "
        "appointment at 9 am. I expect to be back in the office by around 11 am.",
    ),
    (
        "rewr-030",
        "Simplify this instruction:\n"
        "\n"
        "Ensure that the appliance is disconnected from the mains electricity "
        "supply prior to commencing any cleaning or maintenance procedures.",
        "Unplug the appliance before you clean it or do any maintenance.\n"
        "\n"
        "This keeps the safety message but uses short, everyday words that are "
        "easier to follow at a glance.",
    ),
    (
        "rewr-031",
        "Summarise this hotel review in one sentence:\n"
        "\n"
        "The hotel was in a great location, just five minutes from the beach, and "
        "the staff were friendly. However, our room was small and noisy because it "
        "faced the main road, and breakfast was disappointing.",
        "The hotel had a great location near the beach and friendly staff, but the "
        "room was small and noisy and the breakfast was disappointing.",
    ),
    (
        "rewr-032",
        "Rewrite this sentence in the first person:\n"
        "\n"
        "He woke up early, made coffee and went for a run before work.",
        "I woke up early, made coffee and went for a run before work.\n"
        "\n"
        "Only the subject changes, from he to I, because past-tense verbs like "
        "woke, made and went have the same form for every person.",
    ),
    (
        "rewr-033",
        "Rephrase this sentence in three different ways:\n"
        "\n"
        "The meeting has been moved to Thursday.",
        "1. We have rescheduled the meeting for Thursday.\n"
        "2. The meeting will now take place on Thursday.\n"
        "3. Please note that the meeting is now on Thursday instead.",
    ),
    (
        "rewr-034",
        "Make this sentence less repetitive:\n"
        "\n"
        "The garden was beautiful, with beautiful flowers and a beautiful fountain "
        "in the middle of the beautiful lawn.",
        "The garden was lovely, with vivid flowers and an elegant fountain in the "
        "middle of a neatly kept lawn.\n"
        "\n"
        "Replacing each beautiful with a more specific word removes the repetition "
        "and gives the reader a clearer picture.",
    ),
    (
        "rewr-035",
        "Simplify this science sentence:\n"
        "\n"
        "Mitochondria are organelles that generate most of the chemical energy "
        "required to power a cell's biochemical reactions.",
        "Mitochondria are tiny parts inside a cell that make most of the energy "
        "the cell needs to work. That is why they are often called the powerhouses "
        "of the cell.",
    ),
    (
        "rewr-036",
        "Summarise this in one sentence:\n"
        "\n"
        "The bakery on the corner, which has been run by the same family for three "
        "generations, will close at the end of the month because the owners are "
        "retiring and none of their children want to take over the business.",
        "The family-run corner bakery will close at the end of the month because "
        "the owners are retiring and none of their children want to take it over.",
    ),
    (
        "rewr-037",
        "Rewrite this so it sounds more confident:\n"
        "\n"
        "I was just wondering if maybe I could possibly take on a bit more "
        "responsibility in the team?",
        "I would like to take on more responsibility in the team, and I believe I "
        "am ready for it.\n"
        "\n"
        "Removing hedges like just, maybe and possibly makes the request sound "
        "clear and self-assured rather than apologetic.",
    ),
    (
        "rewr-038",
        "Rephrase this for a job advert:\n"
        "\n"
        "We need someone who is good with computers and can talk to customers.",
        "We are looking for a confident communicator with strong computer skills "
        "to support our customers. You will be comfortable with everyday software "
        "and enjoy helping people solve problems by phone, by email and in person.",
    ),
    (
        "rewr-039",
        "Summarise these instructions in one line:\n"
        "\n"
        "First, rinse the rice in cold water. Then put it in a pan with twice as "
        "much water. Bring it to the boil, cover, and simmer gently for about "
        "twelve minutes. Finally, leave it covered off the heat for five minutes "
        "before serving.",
        "Rinse the rice, simmer it covered in twice its volume of water for about "
        "twelve minutes, then let it rest covered off the heat for five minutes "
        "before serving.",
    ),
    (
        "rewr-040",
        "Rewrite this sentence without the double negative:\n"
        "\n"
        "It is not unlikely that the shop won't be open on Sunday.",
        "It is likely that the shop will be closed on Sunday.\n"
        "\n"
        "Not unlikely means likely, and won't be open means closed, so removing "
        "both negatives gives a much clearer sentence with the same meaning.",
    ),
]

# Classification: label a given text, with a one-line justification.
CLASSIFICATION: list[Record] = [
    (
        "clas-001",
        "Classify the sentiment of this review as positive, negative or neutral:\n"
        "\n"
        "The pasta was perfectly cooked and the staff couldn't have been kinder.",
        "Positive. The reviewer praises both the food, calling the pasta perfectly "
        "cooked, and the service, saying the staff could not have been kinder, "
        "with no complaints at all.",
    ),
    (
        "clas-002",
        "Is this sentence positive, negative or neutral?\n"
        "\n"
        "The package arrived three days late and the box was crushed.",
        "Negative. The writer reports two separate problems with their order, a "
        "late delivery and a damaged box, and mentions nothing good about the "
        "experience.",
    ),
    (
        "clas-003",
        "Classify this headline as sport, politics, technology or health:\n"
        "\n"
        "New smartphone chip promises twice the battery life.",
        "Technology. The headline is about a new smartphone chip and its effect on "
        "battery life, which is a consumer electronics topic rather than sport, "
        "politics or health.",
    ),
    (
        "clas-004",
        "What is the sentiment of this post?\n"
        "\n"
        "Another Monday, another broken coffee machine at work. Great start to the "
        "week.",
        "Negative. Although it uses the word great, the phrase is sarcastic: the "
        "writer is clearly annoyed about the broken coffee machine and a "
        "frustrating start to the week.",
    ),
    (
        "clas-005",
        "Is the following sentence a fact or an opinion?\n"
        "\n"
        "Water boils at 100 degrees Celsius at sea level.",
        "Fact. It is a measurable claim that can be checked by experiment, and it "
        "is true: at standard sea-level air pressure, pure water boils at 100 "
        "degrees Celsius.",
    ),
    (
        "clas-006",
        "Classify this customer message as a complaint, a question or a "
        "compliment:\n"
        "\n"
        "Do you deliver to addresses outside the city?",
        "Question. The customer is asking for information about delivery areas and "
        "expresses neither satisfaction nor dissatisfaction; they simply want to "
        "know whether their address is covered.",
    ),
    (
        "clas-007",
        "Label the sentiment of this hotel review:\n"
        "\n"
        "The room was clean, but the only view was of a car park.",
        "Mixed, leaning neutral. The writer praises the cleanliness of the room "
        "but is mildly disappointed by the view, so the positive and negative "
        "points roughly balance each other out.",
    ),
    (
        "clas-008",
        "Which category does this sentence belong to: food, travel, finance or "
        "education?\n"
        "\n"
        "The interest rate on my savings account dropped again this month.",
        "Finance. The sentence is about interest rates and a savings account, "
        "which are banking and money matters, so it fits finance rather than food, "
        "travel or education.",
    ),
    (
        "clas-009",
        "Fact or opinion?\n"
        "\n"
        "Summer is the best season of the year.",
        "Opinion. Which season is best depends on personal taste; some people love "
        "the heat of summer while others prefer crisp autumn days, so the claim "
        "cannot be proven true or false.",
    ),
    (
        "clas-010",
        "Is the tone of this message formal or informal?\n"
        "\n"
        "Hiya! Just checking you're still up for lunch tomorrow? Let me know!",
        "Informal. The greeting Hiya, the contraction you're, the casual phrase up "
        "for lunch and the exclamation marks all give it a relaxed, friendly tone "
        "typical of messages between friends.",
    ),
    (
        "clas-011",
        "Classify the sentiment of this product review:\n"
        "\n"
        "It does the job. Nothing special, but nothing wrong with it either.",
        "Neutral. The reviewer says the product works as expected but is not "
        "impressed; there is no real praise or complaint, just a plain statement "
        "that it is adequate.",
    ),
    (
        "clas-012",
        "Categorise this support ticket as billing, technical or account access:\n"
        "\n"
        "I was charged twice for my subscription this month.",
        "Billing. The customer is describing a duplicate charge on their "
        "subscription, which is a payment problem rather than a technical fault or "
        "a login issue.",
    ),
    (
        "clas-013",
        "What emotion does this sentence express?\n"
        "\n"
        "I can't believe I finally got accepted to my dream university!",
        "Joy, with strong excitement. The words finally got accepted and dream "
        "university show that the writer is thrilled, and the exclamation mark "
        "adds to the enthusiasm.",
    ),
    (
        "clas-014",
        "Classify the sentiment of this film review:\n"
        "\n"
        "The plot was predictable, the acting wooden, and I checked my watch at "
        "least five times.",
        "Negative. The reviewer criticises both the plot and the acting, and "
        "checking a watch again and again suggests they were bored and wanted the "
        "film to end.",
    ),
    (
        "clas-015",
        "Is this sentence a question, a command, a statement or an exclamation?\n"
        "\n"
        "Please close the window before you leave.",
        "Command. It tells the listener to do something, close the window, and the "
        "word please makes it polite but does not change the fact that it is an "
        "instruction.",
    ),
    (
        "clas-016",
        "Classify this animal as a mammal, bird, reptile, amphibian or fish, and "
        "explain why: a dolphin.",
        "Mammal. Although dolphins live in water and look rather like fish, they "
        "breathe air with lungs, are warm-blooded, give birth to live young and "
        "feed them milk, which are all features of mammals.",
    ),
    (
        "clas-017",
        "What is the sentiment of this review?\n"
        "\n"
        "Battery dies within two hours. Returned it the next day.",
        "Negative. The reviewer reports very poor battery life, and returning the "
        "product the next day shows they were unhappy enough to give up on it "
        "completely.",
    ),
    (
        "clas-018",
        "Which genre best fits this book description: fantasy, mystery, romance or "
        "science fiction?\n"
        "\n"
        "A detective must uncover who poisoned the guests at a remote country "
        "house.",
        "Mystery. The description centres on a detective investigating a crime and "
        "identifying the culprit, which is the core of the mystery genre; there is "
        "no magic, future technology or love story mentioned.",
    ),
    (
        "clas-019",
        "Is coal a renewable or a non-renewable energy source?",
        "Non-renewable. Coal formed from ancient plant material over millions of "
        "years, so once it is mined and burned it cannot be replaced on any human "
        "timescale.",
    ),
    (
        "clas-020",
        "What is the sentiment of this message?\n"
        "\n"
        "Thanks so much for your help yesterday, you really saved the day!",
        "Positive. The writer expresses gratitude with thanks so much and praises "
        "the other person warmly by saying they saved the day, showing real "
        "appreciation.",
    ),
    (
        "clas-021",
        "Classify this email as spam or not spam:\n"
        "\n"
        "Congratulations! You have won a free cruise. Click here now to claim your "
        "prize before it expires!",
        "Spam. It announces an unexpected prize, creates urgency with before it "
        "expires, and pushes you to click a link, which are classic signs of a "
        "scam or unwanted marketing message.",
    ),
    (
        "clas-022",
        "Which school subject does this question belong to?\n"
        "\n"
        "What is the capital of Australia?",
        "Geography. The question asks about a country's capital city, which is a "
        "standard geography topic. For the record, the answer is Canberra, not "
        "Sydney as many people guess.",
    ),
    (
        "clas-023",
        "Classify the sentiment of this user comment:\n"
        "\n"
        "The update fixed the crash I reported, but now the app takes ages to load.",
        "Mixed. The user is pleased that the crash was fixed but unhappy that the "
        "app now loads slowly, so the comment contains one clear positive point "
        "and one clear negative point.",
    ),
    (
        "clas-024",
        "Is this statement a fact or an opinion?\n"
        "\n"
        "The Great Wall of China is visible from the Moon with the naked eye.",
        "It is a factual claim, but a false one. It can be checked, so it is not "
        "an opinion, yet the wall is far too narrow to be seen from the Moon with "
        "the naked eye, and astronauts have confirmed this.",
    ),
    (
        "clas-025",
        "Which part of the restaurant experience is this review mainly about: "
        "food, service, price or atmosphere?\n"
        "\n"
        "We waited forty minutes just to be seated and nobody apologised.",
        "Service. The reviewer focuses on the long wait for a table and the lack "
        "of an apology from staff, which concerns how the restaurant treats "
        "customers rather than its food, prices or atmosphere.",
    ),
    (
        "clas-026",
        "Is this sentence sarcastic or sincere?\n"
        "\n"
        "Oh wonderful, it's raining again on my day off.",
        "Sarcastic. The word wonderful is used to mean the opposite; hardly anyone "
        "is genuinely pleased about rain on a day off, so the speaker is "
        "expressing frustration in an ironic way.",
    ),
    (
        "clas-027",
        "In the sentence below, is the word quickly a noun, verb, adjective or "
        "adverb?\n"
        "\n"
        "She ran quickly to catch the bus.",
        "Adverb. Quickly describes how she ran, so it modifies the verb ran. Many "
        "adverbs of manner are formed by adding -ly to an adjective, as with quick "
        "becoming quickly.",
    ),
    (
        "clas-028",
        "Rate the urgency of this message as low, medium or high:\n"
        "\n"
        "The server room is flooding and the equipment is still switched on.",
        "High. Water and live electrical equipment together create an immediate "
        "risk of damage, fire and injury, so this needs action straight away.",
    ),
    (
        "clas-029",
        "Categorise this expense as housing, transport, food or entertainment: a "
        "monthly bus pass.",
        "Transport. A bus pass pays for travel on public transport, so it belongs "
        "in the transport category of a budget rather than housing, food or "
        "entertainment.",
    ),
    (
        "clas-030",
        "What is the sentiment of this sentence?\n"
        "\n"
        "I'm not sure the new policy will make much difference.",
        "Slightly negative, or sceptical. The speaker is not angry, but doubts "
        "that the policy will be effective, which leans toward a mildly negative "
        "view rather than a truly neutral one.",
    ),
    (
        "clas-031",
        "Botanically speaking, is a tomato a fruit or a vegetable?",
        "Fruit. Botanically, a fruit develops from a flower and contains seeds, "
        "and the tomato does both. In cooking, however, it is usually treated as a "
        "vegetable because of its savoury flavour.",
    ),
    (
        "clas-032",
        "Classify this feedback as praise, criticism or a suggestion:\n"
        "\n"
        "It would be great if the app had a dark mode.",
        "Suggestion. The user is proposing a new feature, a dark mode, rather than "
        "praising or criticising what already exists. The polite phrasing it would "
        "be great if signals a request.",
    ),
    (
        "clas-033",
        "Which category fits this sentence best: weather, sports, cooking or "
        "music?\n"
        "\n"
        "The striker scored twice in the second half to win the match.",
        "Sports. The sentence mentions a striker, scoring and winning a match, all "
        "of which point to a football game, so it clearly belongs in the sports "
        "category.",
    ),
    (
        "clas-034",
        "Classify the sentiment of this app store review:\n"
        "\n"
        "Five stars! It has completely changed how I plan my week.",
        "Positive. The reviewer gives the highest rating and says the app has "
        "completely changed how they plan, showing they find it genuinely useful "
        "and are very satisfied.",
    ),
    (
        "clas-035",
        "True or false: bats are blind. Explain your answer.",
        "False. Bats are not blind; all bat species can see, and some fruit bats "
        "have excellent eyesight. Many bats also use echolocation to hunt in the "
        "dark, which is probably where the myth comes from.",
    ),
    (
        "clas-036",
        "Label the register of this sentence as formal, neutral or slang:\n"
        "\n"
        "That concert was lit, no cap.",
        "Slang. Lit is informal slang for exciting or excellent, and no cap is "
        "slang meaning no lie or for real, so the sentence is very casual and "
        "typical of younger speakers online.",
    ),
    (
        "clas-037",
        "A banking chatbot receives this message. What is the user's intent?\n"
        "\n"
        "I'd like to check how much money is in my account.",
        "Balance enquiry. The user wants to know their current account balance, "
        "not to make a transfer, report a problem or change their details, so the "
        "chatbot should route them to a balance check.",
    ),
    (
        "clas-038",
        "What kind of reasoning error, if any, does this sentence contain?\n"
        "\n"
        "Everyone I know loves this film, so it must be the best film ever made.",
        "A hasty generalisation combined with an appeal to popularity. The speaker "
        "draws a sweeping conclusion from a small, unrepresentative group of "
        "friends, and popularity alone does not prove that a film is the best ever "
        "made.",
    ),
    (
        "clas-039",
        "Classify the sentiment of this statement:\n"
        "\n"
        "The forecast says it will be cloudy tomorrow with a high of 15 degrees.",
        "Neutral. The sentence simply reports a weather forecast without any "
        "opinion or emotion; it does not say whether the cloudy weather is a good "
        "or a bad thing.",
    ),
    (
        "clas-040",
        "Is rubber a conductor or an insulator of electricity?",
        "Insulator. Rubber does not let electric current flow easily because its "
        "electrons are tightly bound, which is why it is used to coat wires and to "
        "make protective gloves for electricians.",
    ),
]


RECORDS: list[Record] = (
    EXPLANATION + WRITING + LISTS + REASONING + REWRITING + CLASSIFICATION
)


def kind_of(record_id: str) -> str:
    """Return the kind for an id such as "expl-001"."""
    match = ID_PATTERN.match(record_id)
    if match is None or match["prefix"] not in KINDS:
        raise ValueError(f"malformed record id: {record_id!r}")
    return KINDS[match["prefix"]]


def is_heldout(record_id: str) -> bool:
    """The split rule: id numbers that are multiples of HELDOUT_EVERY."""
    match = ID_PATTERN.match(record_id)
    if match is None:
        raise ValueError(f"malformed record id: {record_id!r}")
    return int(match["number"]) % HELDOUT_EVERY == 0


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def validate(records: list[Record]) -> list[str]:
    """Return a list of problems with the records (empty when all is well)."""
    problems: list[str] = []
    seen_ids: set[str] = set()
    seen_prompts: dict[str, str] = {}
    for record_id, prompt, response in records:
        try:
            kind_of(record_id)
        except ValueError as exc:
            problems.append(str(exc))
        if record_id in seen_ids:
            problems.append(f"{record_id}: duplicate id")
        seen_ids.add(record_id)
        for name, text in (("prompt", prompt), ("response", response)):
            if not text.strip():
                problems.append(f"{record_id}: empty {name}")
            elif text != text.strip():
                problems.append(f"{record_id}: {name} has surrounding whitespace")
        key = _normalise(prompt)
        if key in seen_prompts:
            problems.append(
                f"{record_id}: same prompt as {seen_prompts[key]}"
            )
        seen_prompts.setdefault(key, record_id)
        words = len(response.split())
        if not MIN_RESPONSE_WORDS <= words <= MAX_RESPONSE_WORDS:
            problems.append(
                f"{record_id}: response has {words} words, expected "
                f"{MIN_RESPONSE_WORDS}-{MAX_RESPONSE_WORDS}"
            )
    return problems


def to_json_line(record: Record) -> str:
    record_id, prompt, response = record
    obj = {
        "id": record_id,
        "kind": kind_of(record_id),
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ],
    }
    return json.dumps(obj, ensure_ascii=False) + "\n"


def render(records: list[Record]) -> dict[Path, str]:
    """Build the text of both output files, keyed by path."""
    train: list[str] = []
    heldout: list[str] = []
    for record in sorted(records, key=lambda r: r[0]):
        (heldout if is_heldout(record[0]) else train).append(to_json_line(record))
    return {TRAIN_PATH: "".join(train), HELDOUT_PATH: "".join(heldout)}


def _display(path: Path) -> str:
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in memory and exit 1 if the files on disk differ",
    )
    args = parser.parse_args(argv)

    problems = validate(RECORDS)
    if problems:
        for problem in problems:
            print(f"invalid record: {problem}", file=sys.stderr)
        return 2

    outputs = render(RECORDS)

    if args.check:
        stale = 0
        for path, text in outputs.items():
            try:
                on_disk = path.read_bytes()
            except FileNotFoundError:
                print(f"{_display(path)}: missing", file=sys.stderr)
                stale += 1
                continue
            if on_disk != text.encode("utf-8"):
                print(f"{_display(path)}: differs from generated output",
                      file=sys.stderr)
                stale += 1
        if stale:
            print("run: python data/build_data.py", file=sys.stderr)
            return 1
        print("dataset files are up to date")
        return 0

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in outputs.items():
        # write_bytes: no platform newline translation, so output is byte-identical.
        path.write_bytes(text.encode("utf-8"))
        print(f"wrote {_display(path)} ({text.count(chr(10))} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
