"""The story generator's words: characters, things, places, plot-specific details and openings.

Plain data, read by `stories/__init__.py`. Templates may hold slots ({A}, {A.his}, {toy.a}, ...);
see the package docstring for what they mean.
"""

# ---------------------------------------------------------------- characters
GIRL_NAMES = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Sara", "Zoe", "Ella", "Amy",
              "Lola", "Ruby", "Kate", "Rose", "Jane", "Molly", "Daisy", "Grace", "Kim", "Sophie"]
BOY_NAMES = ["Tom", "Ben", "Sam", "Tim", "Jack", "Leo", "Jake", "Bob", "Finn", "Timmy",
             "Joe", "Noah", "Luke", "Billy", "Danny", "Max", "Alex", "Ryan", "Eli", "Nick"]
# Pets get gendered names too, so a reader (and the tests) can tell "he" from "she" by the name.
SHE_PET_NAMES = ["Bella", "Coco", "Luna", "Fluffy", "Pepper", "Rosie", "Ginger", "Penny", "Kiki", "Snowy"]
HE_PET_NAMES = ["Spot", "Buddy", "Rex", "Milo", "Oscar", "Rocky", "Biscuit", "Toby", "Pip", "Bruno"]
PRONOUNS = {  # he, him, his, himself
    "he": ("he", "him", "his", "himself"),
    "she": ("she", "her", "her", "herself"),
}
CHILD_ADJECTIVES = ["little", "kind", "happy", "sweet", "small", "curious", "cheerful", "good"]
CHILD_JOY = ["clapped {his} hands", "jumped up and down", "smiled from ear to ear",
             "did a happy dance", "laughed and laughed"]
ANIMALS = {  # kind: (adjectives, what it does when it is happy)
    "dog": (["brown", "little", "big", "friendly", "fluffy"], "wagged {his} tail"),
    "puppy": (["little", "brown", "playful"], "wagged {his} tail"),
    "cat": (["little", "gray", "orange", "soft", "white"], "purred happily"),
    "kitten": (["little", "soft", "playful"], "purred happily"),
    "bunny": (["little", "white", "fluffy", "brown"], "hopped up and down"),
    "bear": (["little", "brown", "big", "friendly"], "smiled a big bear smile"),
    "duck": (["little", "yellow", "happy"], "flapped {his} wings"),
    "mouse": (["tiny", "gray", "little"], "squeaked with joy"),
    "fox": (["little", "red", "clever"], "did a happy dance"),
    "owl": (["wise", "little", "brown"], "hooted with joy"),
    "frog": (["green", "little", "happy"], "jumped up high"),
    "elephant": (["little", "gray", "big"], "waved {his} trunk"),
    "monkey": (["funny", "little", "brown"], "jumped up and down"),
    "pig": (["little", "pink", "happy"], "squealed with joy"),
}
TRAITS = ["kind", "happy", "friendly", "playful", "curious", "cheerful"]

# ---------------------------------------------------------------- things and places
TOYS = {
    "ball": ["red", "big", "blue", "bouncy"], "kite": ["red", "yellow", "big"],
    "teddy bear": ["soft", "brown", "little"], "doll": ["pretty", "little", "new"],
    "toy car": ["red", "little", "fast"], "toy boat": ["blue", "little", "red"],
    "hat": ["red", "big", "funny"], "book": ["big", "new", "pretty"],
    "toy truck": ["big", "yellow", "green"], "balloon": ["red", "big", "shiny"],
    "blanket": ["soft", "warm", "blue"], "box": ["red", "little", "shiny"],
    "shell": ["pretty", "pink", "shiny"], "toy train": ["blue", "long", "little"],
    "toy robot": ["shiny", "little", "silver"], "drum": ["little", "red", "loud"],
}
# Only these can "break into two pieces" and be glued without the story sounding silly.
BREAKABLE = ["toy car", "toy boat", "kite", "doll", "toy truck", "toy train", "toy robot", "drum"]
PLACES = {  # place: (preposition, spots where a lost thing can hide)
    "park": ("in", ["under a bench", "behind a big tree", "near the slide", "in the tall grass"]),
    "garden": ("in", ["under a bush", "behind the flowers", "next to a big rock", "by the gate"]),
    "forest": ("in", ["under a log", "behind a tree", "in a pile of leaves", "near a stream"]),
    "beach": ("at", ["in the sand", "behind a big rock", "next to a sand castle", "near the water"]),
    "backyard": ("in", ["under the steps", "behind the fence", "in the grass", "by the tree"]),
    "farm": ("on", ["in the hay", "behind the barn", "next to the pig pen", "under the fence"]),
    "playground": ("at", ["under the swings", "next to the slide", "in the sandbox", "by the gate"]),
    "field": ("in", ["in the tall grass", "behind a big rock", "near a little tree", "by a log"]),
    "pond": ("at", ["near the water", "behind a rock", "under a big leaf", "in the grass"]),
}
HOMES = ["woods", "sea", "big hill", "river", "park", "farm"]
GAMES = ["tag", "hide and seek", "catch", "with blocks", "in the sand", "with a ball"]
FLOWERS = ["big yellow sunflower", "pretty red flower", "tall green plant",
           "bush full of pink flowers", "little tree with red apples"]

# Plot-specific slots. Their text may hold slots itself ({A.He}); _fill() formats until none is left.
FEARS = [
    dict(name="the big slide", to="to the playground",
         go="{A.He} climbed to the top and went down the slide.", fun="Whee! It was fast and so much fun!"),
    dict(name="the big waves", to="to the beach",
         go="{A.He} held {A.his} {P}'s hand and walked into the water.",
         fun="The little waves splashed {A.his} feet. It was cool and fun!"),
    dict(name="the tall swing", to="to the park", go="{A.He} sat on the swing and held on tight.",
         fun="{A.He} went up high and felt the wind on {A.his} face. It was so much fun!"),
    dict(name="the dark forest", to="to the forest", go="{A.He} took a big step into the trees.",
         fun="The birds sang and the flowers were pretty. It was not scary at all!"),
    dict(name="the big horse", to="to the farm",
         go="{A.He} held out an apple, and the horse ate it from {A.his} hand.",
         fun="The horse was soft and gentle. It was not scary at all!"),
]
TROUBLES = [
    dict(name="bird", a="a little bird", at="in the garden", to="to the garden",
         problem="could not fly because its wing was hurt",
         help="{A} picked up the bird very gently. {A.He} and {A.his} {P} gave it water and seeds.",
         end="After a few days, the wing was better. The bird flew up high and sang a happy song."),
    dict(name="kitten", a="a little kitten", at="in the park", to="to the park",
         problem="was stuck up in a tall tree",
         help="{A} ran to get {A.his} {P}. {A.His} {P} got a ladder and climbed up the tree.",
         end="Soon the kitten was safe on the ground. It purred and rubbed its head on {A}'s leg."),
    dict(name="duck", a="a baby duck", at="at the pond", to="to the pond",
         problem="was lost and could not find its mom",
         help="{A} looked all around the pond. Then {A.he} saw a big duck near the water.",
         end="The baby duck ran to its mom. They were together again!"),
    dict(name="puppy", a="a little puppy", at="in the backyard", to="to the backyard",
         problem="was stuck in a deep hole",
         help="{A} lay down on the grass and reached into the hole. {A.He} pulled the puppy out.",
         end="The puppy licked {A}'s face and wagged its tail."),
    dict(name="turtle", a="a small turtle", at="at the beach", to="to the beach",
         problem="was on its back and could not turn over", help="{A} gently turned the turtle over.",
         end="The turtle walked slowly back into the water. It looked happy to be home."),
]
GIFTS = [
    dict(name="the flowers", make="{A.He} went to the garden and picked some pretty flowers.",
         care="{A.He} picked only the best ones."),
    dict(name="the picture", make="{A.He} got some paper and drew a big picture of {A.his} family.",
         care="{A.He} used all of {A.his} best colors."),
    dict(name="the card", make="{A.He} made a card with a big red heart on it.",
         care='Inside, {A.he} wrote, "I love you."'),
    dict(name="the rock", make="{A.He} found a smooth rock and painted it blue and yellow.",
         care="Then {A.he} waited for the paint to dry."),
    dict(name="the necklace", make="{A.He} made a necklace with lots of pretty beads.",
         care="{A.He} put the beads on the string one by one."),
]
FINDS = [
    dict(a="an old box", reveal="{A} opened the box slowly. Inside, there were lots of shiny buttons!",
         end="{A.He} took the buttons home, and {A.he} and {A.his} {P} made a pretty picture with them."),
    dict(a="a big egg", reveal="Then the egg began to shake. Crack! Out came a tiny baby bird!",
         end="{A} put the baby bird back in its nest. Soon its mom came back and sang a happy song."),
    dict(a="a little map", reveal="The map showed a big red X next to an old tree.",
         end="{A} ran to the old tree and dug in the dirt. There was a small box full of toys!"),
    dict(a="a tiny door", reveal="{A} knocked on the tiny door. It opened, and a little mouse looked out!",
         end='"Hello!" said the mouse. "Come in and have some cake." {A} and the mouse became good friends.'),
]
RULES = [
    dict(start="{day} it rained all morning. When the sun came out, {A} wanted to play outside.",
         warn='"You can go out, but stay away from the big mud puddle," said {A.his} {P}.',
         act="{A} saw the big puddle. It looked like so much fun! {A.He} jumped right in. Splash!",
         oops="Mud went all over {A.his} clothes and {A.his} face. {A.He} was wet and cold.",
         fix="{A.His} {P} gave {A.him} a warm bath and a big hug."),
    dict(start="{day} {A.his} {P} made a big plate of cookies. The whole house smelled sweet.",
         warn='"Please do not eat the cookies before dinner," said {A.his} {P}.',
         act="But the cookies smelled so good. When no one was looking, {A} ate one, then two, then five!",
         oops="Soon {A.his} tummy began to hurt, and {A.he} could not eat {A.his} dinner.",
         fix="{A.His} {P} gave {A.him} some warm milk and put {A.him} to bed."),
    dict(start="{day} {A} was playing in the backyard with {A.his} {P}.",
         warn='"Do not climb the tall tree. It is not safe," said {A.his} {P}.',
         act="But {A} wanted to see the birds at the top. {A.He} climbed up, higher and higher.",
         oops="Then {A.he} looked down and got very scared. {A.He} was stuck!",
         fix="{A.His} {P} came with a ladder and helped {A.him} down."),
]

# ---------------------------------------------------------------- openings
ONCE_OPENINGS = ["Once upon a time, there was {A.intro}.", "Once upon a time, there lived {A.intro}.",
                 "Once upon a time, in a small town, there was {A.intro}.",
                 "Once upon a time, in a little house near the {home}, there lived {A.intro}."]
OTHER_OPENINGS = ["There was once {A.intro}.", "Once there was {A.intro}.",
                  "One day, {A.intro} woke up with a big smile.",
                  "One morning, {A.intro} woke up feeling happy."]
DAYS = ["One day,", "One sunny day,", "One morning,", "One bright morning,", "One afternoon,",
        "One warm day,"]
LATER = ["Later that day,", "After breakfast,", "That afternoon,"]  # when the opening said "One day"
DESCRIPTIONS = [None, None,  # None: go straight on to the plot
                "{A.He} was very {trait}.", "{A.He} loved to play outside.",
                "Everyone liked {A.him} because {A.he} was so {trait}.", "{A.He} liked to run and play."]
