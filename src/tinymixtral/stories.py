"""An offline corpus of simple children's stories, written by a seeded template generator.

The main job trains a tiny language model and asks it to continue "Once upon a time". The
natural data for that is TinyStories, but it needs a download, so this module writes stories in
the same spirit instead: short plots a small child can follow, a small vocabulary and a lot of
repetition. That regularity is exactly what lets a tiny model learn grammar in minutes on a CPU.

A story is an opening plus a plot. A plot is a list of beats, and each beat lists a few
interchangeable phrasings with slots: {A} is the hero, {B} a friend, {P} the hero's mom or dad.
{A.he}, {A.him}, {A.his}, {A.himself}, {A.He} and {A.His} become the hero's own pronouns, so
agreement is decided once per character rather than in every sentence. All choices come from
one random.Random, so the same seed always gives the same stories.
"""

import random
import re
from types import SimpleNamespace
from typing import Iterator

CORPUS_DESCRIPTION = (
    "Synthetic corpus of template-generated children's stories made by tinymixtral's seeded "
    "story generator (not TinyStories), for offline use."
)

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

# ---------------------------------------------------------------- plots
# "child": the plot only makes sense with a child hero (a parent's ladder, drawing a picture, ...).
HAVE_TOY = ["{A.He} had {toy.a} that {A.he} loved very much.", "{A.His} favorite toy was {toy.a}.",
            "{A.He} had {toy.a}. {A.He} took it everywhere."]
BEST_FRIEND = ["{A} had a good friend, {B.intro}.", "{A.His} best friend was {B.intro}."]
PLOTS = {
    "lost toy": dict(child=False, beats=[
        HAVE_TOY,
        ["{day} {A} took {A.his} {toy.name} {place.to}.",
         "{day} {A} went {place.to} to play with {A.his} {toy.name}."],
        ["{A.He} played for a long time. But when it was time to go home, {A.his} {toy.name} was gone!",
         "{A.He} put {toy.the} down to look at a pretty butterfly. When {A.he} turned around, it was gone!",
         "{A.He} ran and jumped and had lots of fun. But then {A.he} could not find {A.his} {toy.name}!"],
        ['"Oh no!" said {A}. "Where is my {toy.name}?" {A.He} felt very sad.',
         "{A} looked and looked, but {A.he} could not find it. {A.He} sat down and began to cry."],
        ['Just then, {B.intro} came by. "Why are you sad?" asked {B}.',
         '{A.His} friend {B} saw {A.him} and ran over. "What is wrong?" asked {B}.'],
        ['"I lost my {toy.name}," said {A}. "Don\'t worry," said {B}. "I will help you look for it."',
         '{A} told {B} about {A.his} {toy.name}. "Let\'s look for it together," said {B}.'],
        ["They looked all around the {place}. At last, {B} found {toy.the} {place.spot}!",
         "They looked high and low. Then {A} saw {A.his} {toy.name} {place.spot}!"],
        ['{A} was so happy! {A.He} {A.joy}. "Thank you, {B}!" {A.he} said.',
         '"You found it!" cried {A}. {A.He} gave {B} a big hug.'],
        ["{A} learned that friends always help each other.",
         "From that day on, {A} kept {A.his} {toy.name} close. And {A} and {B} became best friends.",
         "After that, {A} never left {A.his} {toy.name} behind again."]]),
    "broken toy": dict(child=False, beats=[
        [s.replace("toy.", "btoy.") for s in HAVE_TOY],
        ["{day} {A} was playing with {A.his} {btoy.name} {place.at}.",
         "{day} {A} took {A.his} {btoy.name} {place.to} to play."],
        ["{A.He} was having so much fun. But then {btoy.the} fell on a big rock and broke!",
         "Suddenly, {A.he} dropped {btoy.the}. Crack! It broke into two pieces."],
        ['"Oh no! My {btoy.name} is broken!" cried {A}. Big tears rolled down {A.his} face.',
         "{A} felt very sad. {A.He} picked up the pieces and began to cry."],
        ['{A} ran home to {A.his} {P}. "{P.Name}, my {btoy.name} is broken," {A.he} said. "Can you fix it?"'],
        ['{A.His} {P} gave {A.him} a hug. "Don\'t be sad," {P.he} said. "We can fix it together."',
         '{A.His} {P} looked at the pieces and smiled. "I think we can fix it," {P.he} said.'],
        ["They got some glue and put the pieces back together. Soon {btoy.the} was as good as new!",
         "{A.His} {P} got some tape, and {A} helped hold the pieces. Soon {btoy.the} was fixed!"],
        ['{A} was so happy. {A.He} {A.joy}. "Thank you, {P.Name}!" {A.he} said.',
         '"You are the best, {P.Name}!" said {A}, and {A.he} gave {A.his} {P} a big hug.'],
        ["From that day on, {A} was more careful with {A.his} toys.",
         "{A} learned that when something breaks, you can ask for help to fix it."]]),
    "sharing": dict(child=False, beats=[
        HAVE_TOY,
        ["{day} {A} was playing with {A.his} {toy.name} {place.at}."],
        ['Then {B.intro} came over. "Can I play with your {toy.name} too?" asked {B}.',
         'Soon {B.intro} walked up to {A.him}. "That is a nice {toy.name}," said {B}. "Can I play with it?"'],
        ['"No!" said {A}. "It is my {toy.name}!"',
         '{A} held {toy.the} close. "No, it is mine," {A.he} said.'],
        ["{B} looked sad and walked away.", "{B} felt sad. {B.He} sat down all alone."],
        ["{A} played by {A.himself}, but it was not fun anymore. {A.He} felt bad inside.",
         "{A} saw how sad {B} was. {A.He} did not feel happy anymore."],
        ['{A} walked over to {B}. "I am sorry," {A.he} said. "Do you want to play with my {toy.name}?"',
         '{A} went to {B} and said, "I am sorry. Let\'s play with my {toy.name} together."'],
        ["{B} smiled a big smile. They took turns and played together all day.",
         "{B} was so happy! The two friends laughed and played until the sun went down."],
        ["{A} learned that sharing is caring.",
         "From that day on, {A} always shared {A.his} toys. Playing together was more fun.",
         "{A} learned that sharing makes everyone happy, and {B} became {A.his} best friend."]]),
    "being brave": dict(child=False, beats=[
        ["{day} {A} and {A.his} {P} went {fear.to}.", "{day} {A.his} {P} took {A.him} {fear.to}."],
        ["There {A.he} saw {fear}. {A} felt scared.", "{A} looked at {fear}. {A.His} legs began to shake."],
        ['"I can\'t do it," said {A} in a small voice. "I am too scared."',
         '"I am scared," {A} said, and {A.he} held on to {A.his} {P}.'],
        ['{A.His} {P} smiled. "It is okay to be scared," {P.he} said. "But I know you can be brave."',
         '{A.His} {P} held {A.his} hand. "You are braver than you think," {P.he} said. "I am right here."'],
        ["{A} took a deep breath. {fear.go}"],
        ["{fear.fun}"],
        ['"I did it!" shouted {A}. {A.He} felt so proud.',
         "{A} {A.joy}. {A.He} was so proud of {A.himself}."],
        ["From that day on, {A} was not afraid of {fear} anymore.",
         "{A} learned that being brave can be fun.",
         "{A} learned that it is okay to be scared, and that you can still be brave."]]),
    "helping an animal": dict(child=True, beats=[
        ["{day} {A} was playing {trouble.at}.", "{day} {A} went {trouble.to} to play."],
        ["Suddenly, {A.he} heard a small sound. It was {trouble.a}! The {trouble} {trouble.problem}.",
         "{A} saw {trouble.a}. The poor {trouble} {trouble.problem}."],
        ['"Don\'t worry, little {trouble}," said {A}. "I will help you."',
         '{A} felt sorry for the {trouble}. "I want to help," {A.he} said.'],
        ["{trouble.help}"],
        ["{trouble.end}"],
        ["{A} felt warm and happy inside.", "{A} smiled. Helping felt so good."],
        ["{A} learned that it is good to help others, big and small.",
         "From that day on, {A} always tried to help animals in need.",
         "{A} would never forget the little {trouble}."]]),
    "new friend": dict(child=False, beats=[
        ["{day} {A} went {place.to}.", "{day} {A} was {place.at} all by {A.himself}."],
        ["{A.He} wanted to play, but {A.he} had no one to play with. {A.He} felt a little lonely.",
         "{A} wanted a friend to play with, but there was no one around."],
        ["Then {A.he} saw {B.intro}. {B.He} was sitting all alone.",
         "Then {A.he} saw {B.intro}. {B.He} looked a little sad."],
        ['{A} felt a little shy. But {A.he} walked over and said, "Hi! My name is {A}. Do you want to play?"',
         '{A} walked over and smiled. "Hello! I am {A}. Will you play with me?"'],
        ['{B} smiled. "Yes, please! My name is {B}."', '"I would love to!" said {B}. "My name is {B}."'],
        ["They played {game} together. They laughed and had so much fun.",
         "First they played {game}, and then they ran and jumped. It was the best day ever."],
        ['When it was time to go home, {B} said, "Thank you for playing with me." {A} smiled and waved.'],
        ["From that day on, {A} and {B} were best friends.",
         "{A} learned that a simple hello can make a new friend."]]),
    "a gift": dict(child=True, beats=[
        ["{A} loved {A.his} {P} very much.", "{A.His} {P} was always kind to {A.him}."],
        ["{day} {A} wanted to make a surprise for {A.his} {P}.",
         "{day} {A} remembered that it was {A.his} {P}'s birthday. {A.He} wanted to give {P.him} a gift."],
        ["{A.He} thought and thought. Then {A.he} had an idea!"],
        ["{gift.make}"],
        ["{gift.care}"],
        ['{A.He} gave {gift} to {A.his} {P}. "Surprise!" said {A}.',
         '{A} ran to {A.his} {P} and said, "This is for you!"'],
        ['{A.His} {P} smiled a big smile. "Thank you so much!" {P.he} said. {P.He} gave {A} a big hug.',
         '{A.His} {P} was so happy. "This is the best gift ever," {P.he} said.'],
        ["{A} felt warm and happy inside. Making others happy made {A.him} happy too.",
         "{A} learned that a gift made with love is the best gift of all."]]),
    "saying sorry": dict(child=False, beats=[
        BEST_FRIEND,
        ["{day} {A} and {B} were playing {place.at}. {B} had {btoy.a}."],
        ["{A} wanted the {btoy.name} too. {A.He} grabbed it, and it fell and broke!",
         '"Let me have it!" said {A}. {A.He} pulled {btoy.the} too hard, and it broke.'],
        ['{B} began to cry. "You broke my {btoy.name}!" {B.he} said.',
         "{B} looked at the broken {btoy.name} and began to cry."],
        ["{A} felt very bad inside. {A.He} knew {A.he} had done something wrong.",
         "{A} did not feel good. {A.He} was sorry."],
        ['{A} said, "I am sorry, {B}. I should not have pulled it. Can I help you fix it?"',
         '"I am so sorry," said {A}. "It was my fault. Let\'s fix it together."'],
        ["They found some tape and fixed {btoy.the} together.",
         "{A} asked {A.his} {P} for some glue, and they fixed {btoy.the} together."],
        ['{B} smiled. "Thank you for saying sorry," {B.he} said.',
         "{B} gave {A} a big hug. They were friends again."],
        ["{A} learned that it is important to say sorry when you make a mistake.",
         "From that day on, {A} always asked before taking things."]]),
    "a surprise find": dict(child=False, beats=[
        ["{A} was a very curious {A.kind}. {A.He} loved to find new things.",
         "{A} liked to explore and look at everything."],
        ["{day} {A} was playing {place.at} when {A.he} saw something {place.spot}.",
         "{day} {A} went {place.to}. {A.He} saw something {place.spot}."],
        ['"What is that?" {A} said. {A.He} walked closer to look. It was {find.a}!',
         "{A.He} went closer. It was {find.a}!"],
        ["{find.reveal}"],
        ["{A} could not believe {A.his} eyes. {A.He} was so excited!", '"Wow!" said {A}. {A.He} {A.joy}.'],
        ["{find.end}"],
        ["{A} learned that the world is full of happy surprises.",
         "It was the best day ever. {A} could not wait to go exploring again."]]),
    "planting a seed": dict(child=True, beats=[
        ["{day} {A.his} {P} gave {A} a little seed.",
         "{day} {A} found a little seed {place.at} and showed it to {A.his} {P}."],
        ['"If you plant it and give it water, it will grow," said {A.his} {P}.'],
        ["{A} dug a small hole in the garden and put the seed in. Then {A.he} gave it some water."],
        ["Every day, {A} looked at the dirt. But nothing happened.",
         "{A} waited one day, then two days. But nothing grew."],
        ['"Why is it not growing?" asked {A}. "Be patient," said {A.his} {P}. "Good things take time."'],
        ["So {A} waited and gave it water every day. Then one morning, {A.he} saw a tiny green leaf!"],
        ["The little plant grew and grew. Soon it was {flower.a}!"],
        ["{A} was so proud. {A.He} {A.joy}.", '"Look, {P.Name}!" said {A}. "My seed grew!"'],
        ["{A} learned that good things come to those who wait.",
         "{A} learned that being patient is not easy, but it is worth it."]]),
    "not listening": dict(child=True, beats=[
        ["{rule.start}"],
        ["{rule.warn}"],
        ['"Okay, {P.Name}," said {A}.'],
        ["{rule.act}"],
        ["{rule.oops}"],
        ['"{P.Name}! Help!" cried {A}.', "{A} began to cry."],
        ["{rule.fix}"],
        ['"I am sorry I did not listen," said {A}. {A.His} {P} smiled and said, "I am glad you are okay."'],
        ["{A} learned that it is important to listen to {A.his} {P}.",
         "From that day on, {A} always listened to {A.his} {P}."]]),
    "a race": dict(child=False, beats=[
        BEST_FRIEND,
        ["{A} and {B} loved to run. {day} they had a race {place.at}.",
         '{day} {A} and {B} went {place.to}. "Let\'s have a race!" said {B}.'],
        ['"Ready, set, go!" said {A}. They ran as fast as they could.',
         'They lined up. "Ready, set, go!" Off they ran!'],
        ["{A} was in front. {A.He} was going to win!",
         "{A} ran faster and faster. {A.He} was almost at the end."],
        ["But then {A.he} heard a cry. {B} had fallen down and hurt {B.his} knee.",
         "Then {A.he} heard {B} cry out. {B} had tripped and fallen down."],
        ["{A} stopped running. {A.He} went back to help {B}.",
         "{A} did not think about winning anymore. {A.He} ran back to {B}."],
        ['"Are you okay?" asked {A}. {A.He} helped {B} get up.'],
        ["They walked to the end together, side by side.",
         "They finished the race together, slowly and with big smiles."],
        ['"Thank you," said {B}. "You are a good friend."'],
        ["{A} learned that being kind is more important than winning.",
         "{A} did not win the race, but {A.he} felt like a winner."]]),
    "a messy room": dict(child=True, beats=[
        ["{A} had lots of toys, but {A.he} never put them away. {A.His} room was very messy."],
        ["{day} {A} wanted to play with {A.his} {toy.full}. But {A.he} could not find it!"],
        ["{A.He} looked on the bed and in the closet, but it was not there.",
         "{A.He} looked under the chair and behind the door, but {A.he} could not find it."],
        ['"{P.Name}, I can\'t find my {toy.name}!" said {A}. {A.His} {P} looked at the messy room.'],
        ['"If you clean up your room, maybe you will find it," said {A.his} {P}.'],
        ["{A} did not want to clean, but {A.he} wanted {A.his} {toy.name}. So {A.he} put away the toys."],
        ["Under a big pile of clothes, {A.he} found {A.his} {toy.name}!",
         "At the bottom of the toy box, there was {A.his} {toy.name}!"],
        ["{A} {A.joy}. {A.His} room looked clean and nice, too."],
        ["From that day on, {A} always put {A.his} toys away.",
         "{A} learned that a clean room makes it easy to find things."]]),
}
PLOT_NAMES = list(PLOTS)
TOY_NAMES, PLACE_NAMES, ANIMAL_KINDS = list(TOYS), list(PLACES), list(ANIMALS)


# ---------------------------------------------------------------- generator
class Slot(SimpleNamespace):
    """A bag of words for one slot; it formats as its name, so templates say {A} and {A.his}."""

    def __format__(self, spec):
        return format(self.name, spec)


def _article(phrase: str) -> str:
    """Return phrase with "a" or "an" in front, chosen by its first letter."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _character(rng, taken, animal):
    gender = rng.choice(("he", "she"))
    if animal:
        kind = rng.choice(ANIMAL_KINDS)
        adjectives, joy = ANIMALS[kind]
        names = HE_PET_NAMES if gender == "he" else SHE_PET_NAMES
    else:
        kind = "boy" if gender == "he" else "girl"
        adjectives, joy = CHILD_ADJECTIVES, rng.choice(CHILD_JOY)
        names = BOY_NAMES if gender == "he" else GIRL_NAMES
    name = rng.choice([n for n in names if n not in taken])  # never "Tom gave Tom a hug"
    taken.add(name)
    he, him, his, himself = PRONOUNS[gender]
    named = rng.choice(("named", "called"))
    intro = f"{_article(rng.choice(adjectives) + ' ' + kind)} {named} {name}"
    return Slot(name=name, kind=kind, intro=intro, joy=joy.format(his=his), he=he, him=him,
                his=his, himself=himself, He=he.capitalize(), His=his.capitalize())


def _parent(rng):
    if rng.random() < 0.5:
        return Slot(name="mom", Name="Mom", he="she", him="her", his="her", He="She")
    return Slot(name="dad", Name="Dad", he="he", him="him", his="his", He="He")


def _thing(rng, name, adjectives):
    full = f"{rng.choice(adjectives)} {name}"
    return Slot(name=name, full=full, a=_article(full), the="the " + name)


def _place(rng):
    name = rng.choice(PLACE_NAMES)
    preposition, spots = PLACES[name]
    return Slot(name=name, at=f"{preposition} the {name}", to=f"to the {name}", spot=rng.choice(spots))


def _fill(template: str, slots: dict) -> str:
    """Fill a template's {slots}; repeat, since a slot's own text may contain slots."""
    while "{" in template:
        template = template.format_map(slots)
    return template


# A slot such as {toy.the} can begin a sentence; capitalise after ". ", "! ", "? ", '. "' and '." '.
# ('!" said Tom' stays lower case: there the quote closes and the sentence goes on.)
_SENTENCE_START = re.compile(r'(^|[.!?] "?|\." )([a-z])')


def generate_story(rng: random.Random) -> str:
    """Return one story, drawing every choice from rng."""
    plot = PLOTS[rng.choice(PLOT_NAMES)]
    taken = set()
    hero = _character(rng, taken, animal=not plot["child"] and rng.random() < 0.4)
    friend = _character(rng, taken, animal=rng.random() < 0.4)
    opening = rng.choice(ONCE_OPENINGS if rng.random() < 0.8 else OTHER_OPENINGS)
    toy, btoy = rng.choice(TOY_NAMES), rng.choice(BREAKABLE)
    slots = dict(
        A=hero, B=friend, P=_parent(rng), place=_place(rng),
        day=rng.choice(LATER if opening.startswith("One") else DAYS),
        toy=_thing(rng, toy, TOYS[toy]), btoy=_thing(rng, btoy, TOYS[btoy]),
        trait=rng.choice(TRAITS), home=rng.choice(HOMES), game=rng.choice(GAMES),
        flower=Slot(a=_article(rng.choice(FLOWERS))), fear=Slot(**rng.choice(FEARS)),
        trouble=Slot(**rng.choice(TROUBLES)), gift=Slot(**rng.choice(GIFTS)),
        find=Slot(**rng.choice(FINDS)), rule=Slot(**rng.choice(RULES)),
    )
    parts = [opening, rng.choice(DESCRIPTIONS)] + [rng.choice(beat) for beat in plot["beats"]]
    text = " ".join(_fill(part, slots) for part in parts if part)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def iter_stories(n: int, seed: int = 0) -> Iterator[str]:
    """Yield n stories, lazily; the same seed always yields the same stories."""
    rng = random.Random(seed)
    for _ in range(n):
        yield generate_story(rng)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """Return n stories as a list; the same seed always gives the same list."""
    return list(iter_stories(n, seed))
