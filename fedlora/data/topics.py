"""Vocabulary and sentence templates of the embedded synthetic fleet (pure data).

Each :class:`Topic` has its own slot vocabulary and templates. A template field
``{name}`` or ``{name2}`` draws from the slot ``name`` (a trailing digit asks
for a value different from the other draws in the same sentence). Fields not
found in the topic come from the writer's context: ``person``, ``place``,
``pet_name`` (personal on private devices, generic on the public split) and
the shared ``day``, ``time`` and ``num`` pools below.

Changing anything here changes the generated text: bump
``fedlora.data.synthetic.GENERATOR_VERSION`` so cached base models are rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    slots: dict[str, tuple[str, ...]]
    templates: tuple[str, ...]


# The tables are laid out by hand, for reading.
# fmt: off
TOPICS: tuple[Topic, ...] = (
    Topic(
        "food",
        {
            "dish": ("pasta", "curry", "tacos", "soup", "pancakes", "risotto", "stir fry",
                     "lasagna", "salad", "chili"),
            "ingredient": ("eggs", "milk", "tomatoes", "onions", "garlic", "rice", "bread",
                           "cheese", "spinach", "lemons", "butter", "coffee beans"),
        },
        (
            "Need to buy {ingredient} and {ingredient2} on the way home.",
            "Making {dish} for dinner tonight, {person} is coming over at {time}.",
            "We loved the {dish} at {place}, let's go back on {day}.",
            "Out of {ingredient} again, add it to the list.",
            "Try the {dish} recipe {person} sent me, it needs {ingredient} and {ingredient2}.",
            "Lunch with {person} at {place} on {day}.",
            "Cooked {dish} for {num} people and nothing was left over.",
            "Remember to take the {ingredient} out of the freezer before {time}.",
        ),
    ),
    Topic(
        "fitness",
        {
            "activity": ("run", "swim", "yoga class", "bike ride", "gym session", "hike",
                         "climbing session", "pilates class"),
            "distance": ("3 km", "5 km", "10 km", "half an hour", "an hour", "twenty minutes"),
            "body": ("knees", "back", "shoulders", "legs", "ankles"),
        },
        (
            "Did a {distance} {activity} this morning, felt great.",
            "Skipped the {activity} today because my {body} hurt.",
            "{person} and I are doing a {activity} at {place} on {day}.",
            "New personal best: {distance} without stopping!",
            "Book the {activity} for {day} at {time}.",
            "Stretch your {body} after every {activity}.",
            "The tracker says {num} thousand steps today.",
            "Sore {body} after yesterday's {activity}, rest day today.",
        ),
    ),
    Topic(
        "work",
        {
            "task": ("the quarterly report", "the slide deck", "the budget review",
                     "the client email", "the code review", "the meeting notes",
                     "the project plan", "the invoice"),
            "meeting": ("standup", "one to one", "planning meeting", "team lunch",
                        "all hands", "client call"),
        },
        (
            "Finish {task} before {day}.",
            "The {meeting} moved to {time}, tell {person}.",
            "Send {task} to {person} by the end of the day.",
            "Long day, the {meeting} ran over again.",
            "Ask {person} about {task} at the {meeting}.",
            "Working from {place} on {day}.",
            "The deadline for {task} is {day} and {num} pages are left.",
            "Remember to book a room for the {meeting}.",
        ),
    ),
    Topic(
        "travel",
        {
            "city": ("Lisbon", "Kyoto", "Berlin", "Montréal", "Edinburgh", "Oaxaca",
                     "Reykjavík", "Marrakesh", "Prague", "Seoul"),
            "transport": ("train", "flight", "bus", "ferry", "night train"),
            "item": ("passport", "charger", "sunscreen", "tickets", "plug adapter",
                     "toothbrush"),
        },
        (
            "Booked the {transport} to {city} for {day}.",
            "Don't forget the {item} and the {item2}.",
            "{city} was beautiful and {person} loved the old town.",
            "The {transport} leaves at {time}, be at the station early.",
            "Hotel near {place} confirmed for {num} nights.",
            "Look up cheap tickets to {city} for the summer.",
            "Pack the {item} tonight so the morning is easy.",
            "Send a postcard to {person} from {city}.",
        ),
    ),
    Topic(
        "family",
        {
            "relative": ("mum", "dad", "grandma", "grandpa", "my sister", "my brother",
                         "my aunt", "my uncle"),
            "event": ("birthday", "anniversary", "school play", "barbecue", "family dinner",
                      "graduation"),
            "gift": ("a book", "flowers", "a scarf", "a board game", "a photo album",
                     "chocolates"),
        },
        (
            "Call {relative} on {day}, it has been too long.",
            "It is {relative}'s {event} on {day}, get {gift}.",
            "Pick up the kids from {place} at {time}.",
            "{person} is hosting the {event} this year.",
            "Bought {gift} for {relative}, wrap it tonight.",
            "Video call with {relative} at {time}.",
            "The photos from the {event} are on the shared drive.",
            "{num} people have said yes to the {event} so far.",
        ),
    ),
    Topic(
        "weather",
        {
            "condition": ("rain", "snow", "sunshine", "fog", "strong wind", "a thunderstorm",
                          "hail"),
            "temp": ("freezing", "chilly", "mild", "warm", "hot", "humid"),
            "garment": ("umbrella", "raincoat", "sunglasses", "gloves", "boots", "sun hat"),
        },
        (
            "The forecast says {condition} on {day}, take the {garment}.",
            "So {temp} today that I stayed inside all afternoon.",
            "Caught in the {condition} near {place} without my {garment}.",
            "It will be {temp} this weekend, perfect for a walk with {person}.",
            "Another {temp} morning, only {num} degrees at {time}.",
            "The {condition} finally stopped and the sky looks great.",
            "Check the weather before driving to {place}.",
            "Lost my {garment} somewhere, again.",
        ),
    ),
    Topic(
        "entertainment",
        {
            "show": ("the new detective series", "that cooking show", "the nature documentary",
                     "the space film", "the comedy special", "the anime"),
            "artist": ("the jazz trio", "the indie band", "the orchestra", "a local DJ",
                       "the folk singer"),
            "media": ("album", "playlist", "podcast", "audiobook", "soundtrack"),
        },
        (
            "Watched {show} with {person}, no spoilers please.",
            "Tickets for {artist} at {place} on {day}!",
            "Add the new {media} from {artist} to the car playlist.",
            "Finished {show} in {num} nights, totally worth it.",
            "{person} recommended a {media} about history.",
            "Movie night on {day}, it starts at {time}.",
            "Can't stop listening to that {media}.",
            "Start {show} next, everyone says it is great.",
        ),
    ),
    Topic(
        "health",
        {
            "clinician": ("dentist", "doctor", "optician", "physio", "dermatologist", "nurse"),
            "medicine": ("vitamins", "allergy pills", "antibiotics", "painkillers",
                         "iron tablets"),
            "symptom": ("a headache", "a sore throat", "a cold", "a stiff neck", "hay fever"),
        },
        (
            "{clinician} appointment on {day} at {time}.",
            "Take the {medicine} with breakfast, {num} more days to go.",
            "Woke up with {symptom}, taking it easy today.",
            "Drink more water and go to bed before {time}.",
            "Pick up the {medicine} at the pharmacy near {place}.",
            "{person} recommended a good {clinician} near {place}.",
            "Still have {symptom}, cancel the plans for {day}.",
            "Slept {num} hours and feeling much better.",
        ),
    ),
    Topic(
        "pets",
        {
            "pet": ("the dog", "the cat", "the puppy", "the kitten", "the rabbit", "the parrot"),
            "pet_item": ("food", "treats", "a new collar", "a chew toy", "litter", "a new bed"),
        },
        (
            "Walk {pet_name} before {time}.",
            "Buy {pet_item} for {pet} on the way back.",
            "{pet_name} knocked a glass off the table again.",
            "Vet appointment for {pet_name} on {day}.",
            "{person} will feed {pet} while we are away.",
            "{pet_name} slept on my laptop for {num} hours.",
            "Took {pet} to {place}, so much fun.",
            "Out of {pet_item} for {pet}, order more.",
        ),
    ),
    Topic(
        "home",
        {
            "chore": ("the laundry", "the dishes", "the windows", "the bathroom", "the fridge",
                      "the garage"),
            "plant": ("tomatoes", "basil", "roses", "a lemon tree", "sunflowers", "herbs"),
            "repair": ("the leaking tap", "the squeaky door", "the broken shelf",
                       "the light in the hall", "the fence"),
        },
        (
            "Sort out {chore} before {person} visits on {day}.",
            "Water the {plant} every morning this week.",
            "Call someone about {repair}.",
            "Fixed {repair} myself, it only took {num} minutes.",
            "Planted {plant} in the garden today.",
            "The bins go out on {day} night.",
            "Rent is due on {day}, transfer it before {time}.",
            "Ask {person} to help with {repair} at the weekend.",
        ),
    ),
)

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = ("7am", "8:30", "noon", "6pm", "half past five", "9pm", "10:15", "4pm")
NUMBERS = ("2", "3", "4", "5", "6", "7", "8", "10", "12")

# Private devices: each writer knows a few of these people, places and pets.
PRIVATE_PEOPLE = (
    "Priya", "Mateo", "Zoë", "Björn", "Amélie", "Kenji", "Aoife", "Tomás", "Fatima", "Olu",
    "Ingrid", "Rafael", "Mei", "Santiago", "Niamh", "Lukas", "Ananya", "Chloé", "Dmitri",
    "Yusuf", "Hana", "Emeka", "Sofía", "Jonas", "Leilani", "Marek", "Nadia", "Oscar", "Rosa",
    "Tariq", "Vikram", "Wen", "Ximena", "Yara", "Zanele", "Hélène", "Søren", "Ayşe", "Łukasz",
    "Gwen",
)
PRIVATE_PLACES = (
    "Lakeside Park", "Café Olé", "the Rusty Anchor", "Maple Street", "Rua Augusta",
    "the Old Mill", "Brixton market", "Kingsway pool", "Harbour Road", "the Green Lantern",
    "Château Rouge", "St Anne's hall", "Elm Grove", "the Blue Door café", "Riverside library",
    "Pine Hill", "the Tivoli", "Market Square", "Westgate", "Juniper Lane", "the climbing barn",
    "Café Düsseldorf", "Hilltop school", "the Crown and Anchor",
)
PRIVATE_PET_NAMES = (
    "Biscuit", "Pickles", "Mochi", "Señor Whiskers", "Noodle", "Pepper", "Ziggy", "Pumpkin",
    "Olive", "Kiwi", "Bao", "Fígaro",
)

# The public split: generic people, places and pets, no personal names.
PUBLIC_PEOPLE = (
    "a friend", "my neighbour", "a colleague", "the manager", "my flatmate", "the teacher",
    "Alex", "Sam", "Jordan", "Chris", "Taylor", "Robin", "Emma", "Liam", "Olivia", "Noah",
    "Ava", "Ethan", "Mia", "Lucas", "Grace", "Daniel", "Ella", "James", "Lily", "Henry",
    "Anna", "David", "Laura", "Peter", "Sarah", "Michael", "Julia", "Mark", "Kate", "Ben",
    "Maria", "Luis", "Aisha", "Omar", "Lena", "Paul", "Nina", "Leo", "Eva", "Max",
)
PUBLIC_PLACES = (
    "the park", "the café", "the station", "the library", "the market", "the office",
    "the pool", "the city centre", "Oak Street", "High Street", "Central Park", "the gym",
    "Mill Lane", "the Red Lion", "Station Road", "the town hall", "Church Street",
    "the beach", "North Park", "the Corner Café", "Bridge Street", "the museum",
)
PUBLIC_PET_NAMES = ("the dog", "the cat", "Buddy", "Max", "Luna", "Bella")

# Personal style of a writer.
GREETINGS = (
    "Hey!", "Note to self:", "Ok so", "Quick one:", "Reminder:", "Morning!", "Dear diary,",
    "Ugh,", "Right,", "Hello me,", "Psst:", "Oi,",
)
SIGNATURES = (
    "— {initial}.", "xx", "- sent from my phone", "cheers, {owner}", "/{initial}", "🙂",
    "~{owner}", "#notes", "(via watch)", "- {owner} ✌️", "end of note", "ttyl",
)
PHRASES = (
    "to be honest", "no way", "for real", "fingers crossed", "lol", "as always", "honestly",
    "can't wait", "oh well", "yikes", "so good", "love it", "typical", "brilliant",
    "not again", "ha", "sigh", "bless", "mega", "whatever",
)
# fmt: on
