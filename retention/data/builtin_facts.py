"""The built-in knowledge set: fact tables and relation phrasings written for this project.

Each :class:`BuiltinRelation` holds (subject, object) pairs, a main template, at least five more phrasings
(every template ends right before the object) and generation prompts. :func:`build_builtin_facts` turns the
tables into :class:`KnowledgeRecord` s; running this module keeps the facts the default model answers
correctly under ``top1`` and writes the shipped ``retention/resources/builtin_facts.json``::

    python -m retention.data.builtin_facts --out retention/resources/builtin_facts.json
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from retention.io import atomic_write_json
from retention.records import KnowledgeRecord, NeighborhoodPrompt, Probe

BUILTIN_FACTS_PATH = Path(__file__).resolve().parents[1] / "resources" / "builtin_facts.json"
N_PARAPHRASES = 2
N_AUGMENTATIONS = 3
N_NEIGHBOURS = 3
N_GENERATION = 2


@dataclass(frozen=True)
class BuiltinRelation:
    """One relation of the built-in set."""

    relation_id: str
    """Wikidata property id where one exists, else a ``builtin:`` id."""
    name: str
    templates: tuple[str, ...]
    """``templates[0]`` is the main (rewrite) template; the others are paraphrase/augmentation phrasings."""
    generation_templates: tuple[str, ...]
    """Open-ended prompts about the subject, for the ``gen`` protocol and fluency checks."""
    facts: tuple[tuple[str, str], ...]
    """(subject, object) pairs."""

    @property
    def objects(self) -> list[str]:
        """Distinct objects, in table order."""
        return list(dict.fromkeys(o for _, o in self.facts))

    def case_id(self, index: int) -> str:
        return f"builtin:{self.relation_id}:{index:03d}"


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    """Parse ``subject | object`` lines."""
    pairs = []
    for line in text.strip().splitlines():
        subject, obj = (part.strip() for part in line.split("|"))
        pairs.append((subject, obj))
    return tuple(pairs)


# Each main template is the phrasing under which the default model answered most candidates of its relation
# (out of ten or so measured); the other phrasings are pairwise unlike each other (relations.resembles), so
# any split of them keeps evaluation paraphrases apart from augmentation phrasings.
RELATIONS: tuple[BuiltinRelation, ...] = (
    BuiltinRelation(
        "P36",
        "capital",
        (
            "The capital city of {} is",
            "The capital of {} is",
            "{}'s capital is",
            "{} has its capital in",
            "{} is a country whose capital is",
            "The seat of government of {} is the city of",
        ),
        ("Travellers who arrive in {} often start their visit in the capital,", "The government of {} meets in"),
        _pairs("""
            France | Paris
            Germany | Berlin
            Italy | Rome
            Spain | Madrid
            Portugal | Lisbon
            Japan | Tokyo
            China | Beijing
            Russia | Moscow
            Egypt | Cairo
            Greece | Athens
            Austria | Vienna
            Poland | Warsaw
            Hungary | Budapest
            Ireland | Dublin
            Norway | Oslo
            Sweden | Stockholm
            Finland | Helsinki
            Denmark | Copenhagen
            Belgium | Brussels
            the Czech Republic | Prague
            Thailand | Bangkok
            South Korea | Seoul
            Indonesia | Jakarta
            the Philippines | Manila
            Vietnam | Hanoi
            Iran | Tehran
            Iraq | Baghdad
            Afghanistan | Kabul
            Kenya | Nairobi
            Peru | Lima
            Argentina | Buenos Aires
            Chile | Santiago
            Colombia | Bogotá
            Venezuela | Caracas
            Cuba | Havana
            Canada | Ottawa
            Australia | Canberra
            New Zealand | Wellington
            Turkey | Ankara
            Ukraine | Kyiv
            Saudi Arabia | Riyadh
            Syria | Damascus
            Lebanon | Beirut
            Pakistan | Islamabad
            Bangladesh | Dhaka
            Nepal | Kathmandu
            Ethiopia | Addis Ababa
            Nigeria | Abuja
            Ghana | Accra
            Morocco | Rabat
            Romania | Bucharest
            Bulgaria | Sofia
            Serbia | Belgrade
            Croatia | Zagreb
            the United Kingdom | London
            Iceland | Reykjavik
            Estonia | Tallinn
            Latvia | Riga
            Lithuania | Vilnius
            Mongolia | Ulaanbaatar
            North Korea | Pyongyang
            Cambodia | Phnom Penh
            Qatar | Doha
            Jordan | Amman
            Tunisia | Tunis
            Algeria | Algiers
            Senegal | Dakar
            Uganda | Kampala
            Zimbabwe | Harare
            Ecuador | Quito
            Uruguay | Montevideo
            Jamaica | Kingston
            Libya | Tripoli
            Sudan | Khartoum
            Somalia | Mogadishu
            Oman | Muscat
            Azerbaijan | Baku
            Armenia | Yerevan
            Belarus | Minsk
            Slovakia | Bratislava
            Slovenia | Ljubljana
            Albania | Tirana
            Bosnia and Herzegovina | Sarajevo
            Cyprus | Nicosia
            Malta | Valletta
            Kazakhstan | Astana
            Uzbekistan | Tashkent
            Kyrgyzstan | Bishkek
            Tajikistan | Dushanbe
            Bhutan | Thimphu
            Angola | Luanda
            Mozambique | Maputo
            Zambia | Lusaka
            Namibia | Windhoek
            Botswana | Gaborone
            Madagascar | Antananarivo
            Rwanda | Kigali
            Mali | Bamako
            Niger | Niamey
            Cameroon | Yaoundé
            Liberia | Monrovia
            Sierra Leone | Freetown
            Costa Rica | San José
            Nicaragua | Managua
            Honduras | Tegucigalpa
            Haiti | Port-au-Prince
            the Dominican Republic | Santo Domingo
            Paraguay | Asunción
            Fiji | Suva
            Laos | Vientiane
        """),
    ),
    BuiltinRelation(
        "P17",
        "country",
        (
            "{} is located in the country of",
            "{} belongs to the country of",
            "The country in which {} lies is",
            "{} is a city in the country of",
            "{} can be found in the nation of",
            "Which country is {} in? It is in",
            "The country where {} is found is",
        ),
        ("Tourists who want to see {} travel to", "{} is one of the largest cities of"),
        _pairs("""
            Barcelona | Spain
            Seville | Spain
            Valencia | Spain
            Munich | Germany
            Hamburg | Germany
            Frankfurt | Germany
            Cologne | Germany
            Milan | Italy
            Venice | Italy
            Florence | Italy
            Naples | Italy
            Turin | Italy
            Osaka | Japan
            Kyoto | Japan
            Hiroshima | Japan
            Marseille | France
            Lyon | France
            Bordeaux | France
            Porto | Portugal
            Shanghai | China
            Shenzhen | China
            Mumbai | India
            Kolkata | India
            Bangalore | India
            Sydney | Australia
            Melbourne | Australia
            Toronto | Canada
            Vancouver | Canada
            Montreal | Canada
            Istanbul | Turkey
            Rio de Janeiro | Brazil
            São Paulo | Brazil
            Saint Petersburg | Russia
            Kraków | Poland
            Rotterdam | the Netherlands
            Antwerp | Belgium
            Zurich | Switzerland
            Geneva | Switzerland
            Gothenburg | Sweden
            Salzburg | Austria
            Casablanca | Morocco
            Alexandria | Egypt
            Johannesburg | South Africa
            Cape Town | South Africa
            Lagos | Nigeria
            Busan | South Korea
            Auckland | New Zealand
            Guadalajara | Mexico
            Medellín | Colombia
            Thessaloniki | Greece
            Nagoya | Japan
            Sapporo | Japan
            Yokohama | Japan
            Stuttgart | Germany
            Dresden | Germany
            Leipzig | Germany
            Nice | France
            Toulouse | France
            Strasbourg | France
            Bologna | Italy
            Genoa | Italy
            Palermo | Italy
            Pisa | Italy
            Málaga | Spain
            Bilbao | Spain
            Granada | Spain
            Guangzhou | China
            Chengdu | China
            Wuhan | China
            Chennai | India
            Hyderabad | India
            Perth | Australia
            Brisbane | Australia
            Calgary | Canada
            Gdańsk | Poland
            Bergen | Norway
            Malmö | Sweden
            Aarhus | Denmark
            Tampere | Finland
            Innsbruck | Austria
            Basel | Switzerland
            Marrakesh | Morocco
            Luxor | Egypt
            Mombasa | Kenya
            Durban | South Africa
            Valparaíso | Chile
            Cusco | Peru
            Rosario | Argentina
            Monterrey | Mexico
            Cancún | Mexico
            Mecca | Saudi Arabia
            Jeddah | Saudi Arabia
            Isfahan | Iran
            Lahore | Pakistan
            Karachi | Pakistan
            Ho Chi Minh City | Vietnam
            Chiang Mai | Thailand
            Surabaya | Indonesia
            Novosibirsk | Russia
            Vladivostok | Russia
            Kharkiv | Ukraine
            Izmir | Turkey
            Tel Aviv | Israel
        """),
    ),
    BuiltinRelation(
        "P37",
        "official language",
        (
            "In {}, the official language is",
            "People in {} speak",
            "The main language of {} is",
            "{}'s official language is",
            "{} is a country where the official language is",
            "In {}, children learn to read and write in",
        ),
        ("Children who grow up in {} learn to speak", "Newspapers in {} are printed in"),
        _pairs("""
            France | French
            Germany | German
            Italy | Italian
            Spain | Spanish
            Portugal | Portuguese
            Brazil | Portuguese
            Mexico | Spanish
            Argentina | Spanish
            Japan | Japanese
            Russia | Russian
            Poland | Polish
            Greece | Greek
            Turkey | Turkish
            the Netherlands | Dutch
            Sweden | Swedish
            Norway | Norwegian
            Finland | Finnish
            Denmark | Danish
            Hungary | Hungarian
            the Czech Republic | Czech
            Romania | Romanian
            Ukraine | Ukrainian
            South Korea | Korean
            Vietnam | Vietnamese
            Thailand | Thai
            Indonesia | Indonesian
            Iran | Persian
            Israel | Hebrew
            Egypt | Arabic
            Saudi Arabia | Arabic
            Austria | German
            Colombia | Spanish
            Chile | Spanish
            Peru | Spanish
            Bulgaria | Bulgarian
            Serbia | Serbian
            Croatia | Croatian
            Iceland | Icelandic
            Pakistan | Urdu
            Bangladesh | Bengali
            Ethiopia | Amharic
            Malaysia | Malay
            Latvia | Latvian
            Lithuania | Lithuanian
            Estonia | Estonian
            Slovakia | Slovak
            Albania | Albanian
            Armenia | Armenian
            Mongolia | Mongolian
            Cuba | Spanish
            Venezuela | Spanish
            Australia | English
            Slovenia | Slovenian
            Belarus | Belarusian
            Kazakhstan | Kazakh
            Uzbekistan | Uzbek
            Somalia | Somali
            Tanzania | Swahili
            Laos | Lao
            Cambodia | Khmer
            Myanmar | Burmese
            Nepal | Nepali
            China | Chinese
            North Korea | Korean
            Ecuador | Spanish
            Uruguay | Spanish
            Costa Rica | Spanish
            Guatemala | Spanish
            Honduras | Spanish
            Nicaragua | Spanish
            the Dominican Republic | Spanish
            Angola | Portuguese
            Mozambique | Portuguese
            Jordan | Arabic
            Iraq | Arabic
            Syria | Arabic
            Libya | Arabic
            Tunisia | Arabic
            Yemen | Arabic
            Oman | Arabic
            Kuwait | Arabic
            Qatar | Arabic
            Lebanon | Arabic
            the United Kingdom | English
            Jamaica | English
            Moldova | Romanian
            Liechtenstein | German
        """),
    ),
    BuiltinRelation(
        "P30",
        "continent",
        (
            "{} is located in the continent of",
            "{} is part of the continent of",
            "{} is a country on the continent of",
            "{} belongs to the continent of",
            "{} is a country in the part of the world called",
            "Which continent is {} in? It is in",
        ),
        ("On a map of the world, {} can be found in", "{} is one of the many countries of"),
        _pairs("""
            France | Europe
            Germany | Europe
            Italy | Europe
            Spain | Europe
            Poland | Europe
            Sweden | Europe
            Norway | Europe
            Greece | Europe
            Portugal | Europe
            Ireland | Europe
            Hungary | Europe
            Austria | Europe
            Belgium | Europe
            Denmark | Europe
            Finland | Europe
            Japan | Asia
            China | Asia
            India | Asia
            Thailand | Asia
            Vietnam | Asia
            Indonesia | Asia
            Pakistan | Asia
            Mongolia | Asia
            Nepal | Asia
            South Korea | Asia
            the Philippines | Asia
            Bangladesh | Asia
            Cambodia | Asia
            Laos | Asia
            Kenya | Africa
            Nigeria | Africa
            Egypt | Africa
            Ethiopia | Africa
            Ghana | Africa
            Morocco | Africa
            Senegal | Africa
            Zimbabwe | Africa
            Uganda | Africa
            Tanzania | Africa
            Angola | Africa
            Mali | Africa
            Cameroon | Africa
            Brazil | South America
            Argentina | South America
            Chile | South America
            Peru | South America
            Colombia | South America
            Venezuela | South America
            Bolivia | South America
            Ecuador | South America
            Uruguay | South America
            Paraguay | South America
            Canada | North America
            Mexico | North America
            Guatemala | North America
            Honduras | North America
            Romania | Europe
            Bulgaria | Europe
            Serbia | Europe
            Croatia | Europe
            the Czech Republic | Europe
            Slovakia | Europe
            the Netherlands | Europe
            Switzerland | Europe
            Iceland | Europe
            Estonia | Europe
            Lithuania | Europe
            Albania | Europe
            Malaysia | Asia
            Myanmar | Asia
            Sri Lanka | Asia
            Afghanistan | Asia
            Kazakhstan | Asia
            Uzbekistan | Asia
            Bhutan | Asia
            North Korea | Asia
            Taiwan | Asia
            Singapore | Asia
            Somalia | Africa
            Sudan | Africa
            Zambia | Africa
            Mozambique | Africa
            Namibia | Africa
            Botswana | Africa
            Madagascar | Africa
            Rwanda | Africa
            Algeria | Africa
            Tunisia | Africa
            Libya | Africa
            Niger | Africa
            Chad | Africa
            Liberia | Africa
            Guyana | South America
            Suriname | South America
            Nicaragua | North America
            Costa Rica | North America
            Panama | North America
        """),
    ),
    BuiltinRelation(
        "P38",
        "currency",
        (
            "The official currency of {} is the",
            "The currency of {} is the",
            "{}'s currency is the",
            "{} uses a currency called the",
            "Shops in {} accept payment in the local currency, the",
            "{} pays for goods in its national currency, the",
        ),
        ("Prices in the shops of {} are given in", "Before travelling to {}, tourists exchange their money for"),
        _pairs("""
            Japan | Japanese yen
            China | Chinese yuan
            India | Indian rupee
            Russia | Russian ruble
            the United Kingdom | British pound
            Germany | euro
            France | euro
            Italy | euro
            Spain | euro
            Greece | euro
            Mexico | Mexican peso
            Argentina | Argentine peso
            Brazil | Brazilian real
            South Korea | South Korean won
            Switzerland | Swiss franc
            Sweden | Swedish krona
            Norway | Norwegian krone
            Denmark | Danish krone
            Poland | Polish zloty
            Hungary | Hungarian forint
            Turkey | Turkish lira
            South Africa | South African rand
            Thailand | Thai baht
            Vietnam | Vietnamese dong
            Indonesia | Indonesian rupiah
            Malaysia | Malaysian ringgit
            Israel | Israeli shekel
            Saudi Arabia | Saudi riyal
            Qatar | Qatari riyal
            Morocco | Moroccan dirham
            Nigeria | Nigerian naira
            Kenya | Kenyan shilling
            the Philippines | Philippine peso
            Pakistan | Pakistani rupee
            Canada | Canadian dollar
            Australia | Australian dollar
            Egypt | Egyptian pound
            the Czech Republic | Czech koruna
            Ukraine | Ukrainian hryvnia
            Bangladesh | Bangladeshi taka
            Iran | Iranian rial
            Chile | Chilean peso
            Colombia | Colombian peso
            Ghana | Ghanaian cedi
            Portugal | euro
            Ireland | euro
            the Netherlands | euro
            Belgium | euro
            Austria | euro
            Finland | euro
            Iceland | Icelandic króna
            Peru | Peruvian sol
            Venezuela | Venezuelan bolívar
            Cuba | Cuban peso
            Uruguay | Uruguayan peso
            Slovakia | euro
            Slovenia | euro
            Estonia | euro
            Latvia | euro
            Lithuania | euro
            Luxembourg | euro
            Malta | euro
            Cyprus | euro
            Romania | Romanian leu
            Bulgaria | Bulgarian lev
            Serbia | Serbian dinar
            Algeria | Algerian dinar
            Tunisia | Tunisian dinar
            Jordan | Jordanian dinar
            Kuwait | Kuwaiti dinar
            Sri Lanka | Sri Lankan rupee
            Nepal | Nepalese rupee
            Ethiopia | Ethiopian birr
            Tanzania | Tanzanian shilling
            Uganda | Ugandan shilling
            Jamaica | Jamaican dollar
        """),
    ),
    BuiltinRelation(
        "P50",
        "author",
        (
            "{} is a classic book by",
            "{} was written by",
            "{} is a book by",
            "{}, the famous book by",
            "{} is one of the best-known books by",
            "The famous writer who wrote {} is",
            "{} is a work of literature by",
        ),
        ("Literature students who read {} also study the life of its author,", "{} is one of the best-known works of"),
        _pairs("""
            Pride and Prejudice | Jane Austen
            Sense and Sensibility | Jane Austen
            Hamlet | William Shakespeare
            Romeo and Juliet | William Shakespeare
            Nineteen Eighty-Four | George Orwell
            Animal Farm | George Orwell
            The Great Gatsby | F. Scott Fitzgerald
            To Kill a Mockingbird | Harper Lee
            Moby-Dick | Herman Melville
            War and Peace | Leo Tolstoy
            Anna Karenina | Leo Tolstoy
            Crime and Punishment | Fyodor Dostoevsky
            The Brothers Karamazov | Fyodor Dostoevsky
            Don Quixote | Miguel de Cervantes
            The Odyssey | Homer
            The Iliad | Homer
            Frankenstein | Mary Shelley
            Dracula | Bram Stoker
            The Hobbit | J. R. R. Tolkien
            The Lord of the Rings | J. R. R. Tolkien
            Harry Potter and the Philosopher's Stone | J. K. Rowling
            Oliver Twist | Charles Dickens
            A Tale of Two Cities | Charles Dickens
            Great Expectations | Charles Dickens
            The Adventures of Tom Sawyer | Mark Twain
            Adventures of Huckleberry Finn | Mark Twain
            Les Misérables | Victor Hugo
            The Hunchback of Notre-Dame | Victor Hugo
            The Catcher in the Rye | J. D. Salinger
            Brave New World | Aldous Huxley
            Fahrenheit 451 | Ray Bradbury
            The Old Man and the Sea | Ernest Hemingway
            A Farewell to Arms | Ernest Hemingway
            Wuthering Heights | Emily Brontë
            Jane Eyre | Charlotte Brontë
            The Divine Comedy | Dante Alighieri
            Ulysses | James Joyce
            On the Origin of Species | Charles Darwin
            One Hundred Years of Solitude | Gabriel García Márquez
            The Metamorphosis | Franz Kafka
            Alice's Adventures in Wonderland | Lewis Carroll
            The Time Machine | H. G. Wells
            The War of the Worlds | H. G. Wells
            The Prince | Niccolò Machiavelli
            Madame Bovary | Gustave Flaubert
            The Picture of Dorian Gray | Oscar Wilde
            The Grapes of Wrath | John Steinbeck
            Of Mice and Men | John Steinbeck
            Gulliver's Travels | Jonathan Swift
            Robinson Crusoe | Daniel Defoe
            Treasure Island | Robert Louis Stevenson
            The Da Vinci Code | Dan Brown
            A Brief History of Time | Stephen Hawking
            The Communist Manifesto | Karl Marx
            The Art of War | Sun Tzu
            Harry Potter and the Chamber of Secrets | J. K. Rowling
            The Chronicles of Narnia | C. S. Lewis
            Little Women | Louisa May Alcott
            The Little Prince | Antoine de Saint-Exupéry
            Charlie and the Chocolate Factory | Roald Dahl
            Matilda | Roald Dahl
            The Cat in the Hat | Dr. Seuss
            The Hitchhiker's Guide to the Galaxy | Douglas Adams
            The Shining | Stephen King
            Carrie | Stephen King
            Murder on the Orient Express | Agatha Christie
            The Jungle Book | Rudyard Kipling
            Peter Pan | J. M. Barrie
            Heart of Darkness | Joseph Conrad
            The Call of the Wild | Jack London
            Twilight | Stephenie Meyer
            The Hunger Games | Suzanne Collins
            A Game of Thrones | George R. R. Martin
            Dune | Frank Herbert
            The Wealth of Nations | Adam Smith
            Das Kapital | Karl Marx
            Faust | Johann Wolfgang von Goethe
            Macbeth | William Shakespeare
            Othello | William Shakespeare
        """),
    ),
    BuiltinRelation(
        "P86",
        "composer",
        (
            "{} is a piece of music by",
            "{} was composed by",
            "{} is a famous composition by",
            "{}, the famous piece by",
            "The music of {} was written by",
            "{} is a classical work by",
            "{} is one of the best-known works of the composer",
        ),
        ("Orchestras around the world still perform {}, the work of", "{} remains one of the most loved pieces by"),
        _pairs("""
            The Magic Flute | Wolfgang Amadeus Mozart
            Don Giovanni | Wolfgang Amadeus Mozart
            The Marriage of Figaro | Wolfgang Amadeus Mozart
            Eine kleine Nachtmusik | Wolfgang Amadeus Mozart
            Für Elise | Ludwig van Beethoven
            the Moonlight Sonata | Ludwig van Beethoven
            the Eroica Symphony | Ludwig van Beethoven
            The Four Seasons | Antonio Vivaldi
            Swan Lake | Pyotr Ilyich Tchaikovsky
            The Nutcracker | Pyotr Ilyich Tchaikovsky
            the 1812 Overture | Pyotr Ilyich Tchaikovsky
            Carmen | Georges Bizet
            La traviata | Giuseppe Verdi
            Aida | Giuseppe Verdi
            Rigoletto | Giuseppe Verdi
            Madama Butterfly | Giacomo Puccini
            La bohème | Giacomo Puccini
            Tosca | Giacomo Puccini
            Turandot | Giacomo Puccini
            The Barber of Seville | Gioachino Rossini
            the William Tell Overture | Gioachino Rossini
            The Ring of the Nibelung | Richard Wagner
            Ride of the Valkyries | Richard Wagner
            Tristan und Isolde | Richard Wagner
            the Brandenburg Concertos | Johann Sebastian Bach
            The Well-Tempered Clavier | Johann Sebastian Bach
            the Goldberg Variations | Johann Sebastian Bach
            Messiah | George Frideric Handel
            Water Music | George Frideric Handel
            The Rite of Spring | Igor Stravinsky
            The Firebird | Igor Stravinsky
            Boléro | Maurice Ravel
            Clair de lune | Claude Debussy
            The Blue Danube | Johann Strauss II
            Rhapsody in Blue | George Gershwin
            Porgy and Bess | George Gershwin
            The Planets | Gustav Holst
            Peer Gynt | Edvard Grieg
            the Hungarian Rhapsodies | Franz Liszt
            Symphonie fantastique | Hector Berlioz
            Pictures at an Exhibition | Modest Mussorgsky
            Canon in D | Johann Pachelbel
            Gymnopédies | Erik Satie
            Carmina Burana | Carl Orff
            West Side Story | Leonard Bernstein
            The Phantom of the Opera | Andrew Lloyd Webber
            the New World Symphony | Antonín Dvořák
        """),
    ),
    BuiltinRelation(
        "P176",
        "manufacturer",
        (
            "{} is a product made by",
            "{} is manufactured by",
            "{}, made by",
            "{} is designed and sold by",
            "The manufacturer of {} is",
            "The company that makes {} is",
        ),
        ("{} is one of the best-selling products of", "Customers who buy {} are buying a product from"),
        _pairs("""
            the iPhone | Apple
            the iPad | Apple
            the MacBook | Apple
            the iPod | Apple
            the PlayStation | Sony
            the Walkman | Sony
            the Xbox | Microsoft
            the Kinect | Microsoft
            the Corolla | Toyota
            the Camry | Toyota
            the Prius | Toyota
            the Land Cruiser | Toyota
            the Civic | Honda
            the Accord | Honda
            the Mustang | Ford
            the F-150 | Ford
            the Model S | Tesla
            the Model 3 | Tesla
            the Golf | Volkswagen
            the Beetle | Volkswagen
            the Passat | Volkswagen
            the 911 | Porsche
            the Cayenne | Porsche
            the Corvette | Chevrolet
            the Camaro | Chevrolet
            the Pixel phone | Google
            the Kindle | Amazon
            the Game Boy | Nintendo
            the Wii | Nintendo
            the ThinkPad | Lenovo
            the A380 | Airbus
            the 747 | Boeing
            the Big Mac | McDonald's
            the Whopper | Burger King
            Photoshop | Adobe
            the GeForce graphics card | Nvidia
            the Pentium processor | Intel
            the Ryzen processor | AMD
            the Snapdragon chip | Qualcomm
            the Barbie doll | Mattel
            the Galaxy smartphone | Samsung
            the Vespa scooter | Piaggio
            the Wrangler | Jeep
            the Macintosh | Apple
            the AirPods | Apple
            the Zune | Microsoft
            the HoloLens | Microsoft
            the GameCube | Nintendo
            the Model T | Ford
            the Fiesta | Ford
            the Focus | Ford
            the Yaris | Toyota
            the RAV4 | Toyota
            the Jetta | Volkswagen
            the Polo | Volkswagen
            the Boxster | Porsche
            the Chromebook | Google
            the Echo smart speaker | Amazon
            the Model X | Tesla
            the Cybertruck | Tesla
        """),
    ),
    BuiltinRelation(
        "P641",
        "sport",
        (
            "{} is a professional",
            "{} plays professional",
            "{} made a career in the sport of",
            "{} is a star of professional",
            "{} is a world-famous",
            "{} is known around the world as a",
        ),
        ("Fans around the world admire {} for his or her skill at", "{} has won many titles in"),
        _pairs("""
            Lionel Messi | soccer
            Cristiano Ronaldo | soccer
            Neymar | soccer
            Pelé | soccer
            Diego Maradona | soccer
            Zinedine Zidane | soccer
            David Beckham | soccer
            Kylian Mbappé | soccer
            Wayne Rooney | soccer
            Zlatan Ibrahimović | soccer
            Mohamed Salah | soccer
            Thierry Henry | soccer
            Ronaldinho | soccer
            Michael Jordan | basketball
            LeBron James | basketball
            Kobe Bryant | basketball
            Stephen Curry | basketball
            Shaquille O'Neal | basketball
            Magic Johnson | basketball
            Larry Bird | basketball
            Kevin Durant | basketball
            Kareem Abdul-Jabbar | basketball
            Roger Federer | tennis
            Rafael Nadal | tennis
            Novak Djokovic | tennis
            Serena Williams | tennis
            Venus Williams | tennis
            Andy Murray | tennis
            Maria Sharapova | tennis
            Pete Sampras | tennis
            Andre Agassi | tennis
            Steffi Graf | tennis
            Tiger Woods | golf
            Jack Nicklaus | golf
            Rory McIlroy | golf
            Phil Mickelson | golf
            Arnold Palmer | golf
            Babe Ruth | baseball
            Derek Jeter | baseball
            Shohei Ohtani | baseball
            Hank Aaron | baseball
            Sachin Tendulkar | cricket
            Virat Kohli | cricket
            Don Bradman | cricket
            Brian Lara | cricket
            Wayne Gretzky | hockey
            Sidney Crosby | hockey
            Mario Lemieux | hockey
            Dirk Nowitzki | basketball
            Tim Duncan | basketball
            Yao Ming | basketball
            Dwyane Wade | basketball
            Ichiro Suzuki | baseball
            Mickey Mantle | baseball
            Barry Bonds | baseball
            Annika Sörenstam | golf
            Billie Jean King | tennis
            Martina Navratilova | tennis
            Björn Borg | tennis
            John McEnroe | tennis
            Shane Warne | cricket
            MS Dhoni | cricket
            Bobby Orr | hockey
            Alexander Ovechkin | hockey
        """),
    ),
    BuiltinRelation(
        "P1303",
        "instrument",
        (
            "{} made music on the",
            "{} played the",
            "{} is famous for playing the",
            "{} was a virtuoso of the",
            "{} was known for great skill on the",
            "{} performed on the",
        ),
        ("Recordings of {} show an extraordinary talent on the", "On stage, {} was always seen with a"),
        _pairs("""
            Jimi Hendrix | guitar
            Eric Clapton | guitar
            Jimmy Page | guitar
            B.B. King | guitar
            Eddie Van Halen | guitar
            Carlos Santana | guitar
            Chuck Berry | guitar
            Andrés Segovia | guitar
            Louis Armstrong | trumpet
            Miles Davis | trumpet
            Dizzy Gillespie | trumpet
            Chet Baker | trumpet
            John Coltrane | saxophone
            Charlie Parker | saxophone
            Kenny G | saxophone
            Sonny Rollins | saxophone
            Yo-Yo Ma | cello
            Pablo Casals | cello
            Jacqueline du Pré | cello
            Itzhak Perlman | violin
            Niccolò Paganini | violin
            Joshua Bell | violin
            Yehudi Menuhin | violin
            Glenn Gould | piano
            Vladimir Horowitz | piano
            Lang Lang | piano
            Frédéric Chopin | piano
            Franz Liszt | piano
            Arthur Rubinstein | piano
            Ringo Starr | drums
            John Bonham | drums
            Buddy Rich | drums
            Keith Moon | drums
            Neil Peart | drums
            Jaco Pastorius | bass
            Flea | bass
            Bob Dylan | harmonica
            Benny Goodman | clarinet
            James Galway | flute
        """),
    ),
    BuiltinRelation(
        "P246",
        "element symbol",
        (
            "The chemical symbol for {} is",
            "In the periodic table, {} has the symbol",
            "The element {} is written with the symbol",
            "The abbreviation for {} on the periodic table is",
            "The atomic symbol for {} is",
            "Chemists write {} with the symbol",
        ),
        ("In chemistry class, students learn that {} is written as", "On the periodic table, the element {} appears as"),
        _pairs("""
            hydrogen | H
            lithium | Li
            carbon | C
            nitrogen | N
            oxygen | O
            fluorine | F
            neon | Ne
            sodium | Na
            magnesium | Mg
            aluminium | Al
            silicon | Si
            phosphorus | P
            sulfur | S
            chlorine | Cl
            argon | Ar
            potassium | K
            calcium | Ca
            iron | Fe
            copper | Cu
            zinc | Zn
            silver | Ag
            tin | Sn
            gold | Au
            mercury | Hg
            lead | Pb
            uranium | U
            platinum | Pt
            nickel | Ni
            cobalt | Co
            titanium | Ti
            chromium | Cr
            manganese | Mn
            bromine | Br
            tungsten | W
            radon | Rn
            plutonium | Pu
            barium | Ba
            boron | B
            krypton | Kr
            xenon | Xe
            selenium | Se
            strontium | Sr
            caesium | Cs
            radium | Ra
            bismuth | Bi
            antimony | Sb
            iridium | Ir
            palladium | Pd
            gallium | Ga
            germanium | Ge
            vanadium | V
            cadmium | Cd
            thorium | Th
        """),
    ),
    BuiltinRelation(
        "P461",
        "opposite of",
        (
            "The opposite of {} is",
            "The word that means the opposite of {} is",
            "An antonym for {} is",
            "If something is not {}, it is",
            "What is the opposite of {}? The opposite is",
            "A word with the opposite meaning to {} is",
        ),
        (
            "A teacher asks the class for the opposite of the word {}. A student answers",
            "In a word game, players must name the opposite of {}. The right answer is",
        ),
        _pairs("""
            hot | cold
            tall | short
            fast | slow
            happy | sad
            up | down
            left | right
            rich | poor
            young | old
            strong | weak
            early | late
            hard | soft
            wet | dry
            love | hate
            war | peace
            day | night
            black | white
            north | south
            east | west
            true | false
            win | lose
            push | pull
            buy | sell
            friend | enemy
            heavy | light
            thick | thin
            wide | narrow
            deep | shallow
            loud | quiet
            clean | dirty
            empty | full
            high | low
            inside | outside
            alive | dead
            question | answer
            victory | defeat
            success | failure
            ancient | modern
            rough | smooth
            sweet | sour
            cheap | expensive
            always | never
            everything | nothing
            accept | reject
            increase | decrease
            maximum | minimum
            positive | negative
            male | female
            summer | winter
            heaven | hell
            import | export
            entrance | exit
            arrive | depart
            remember | forget
            big | small
            open | closed
            laugh | cry
            begin | finish
            giant | dwarf
            sunrise | sunset
            floor | ceiling
            hero | villain
            wild | tame
            noisy | silent
            fat | thin
            future | past
            attack | defend
            gain | loss
            host | guest
            teacher | student
            predator | prey
            major | minor
            top | bottom
            front | back
            start | stop
            awake | asleep
            dangerous | safe
            easy | difficult
            sharp | blunt
            generous | selfish
            optimist | pessimist
        """),
    ),
)


def _first_word(text: str) -> str:
    return text.split()[0].lower()


def build_builtin_facts(
    seed: int = 0, keep: Collection[str] | None = None, first_token: Callable[[str], Hashable] = _first_word
) -> list[KnowledgeRecord]:
    """Records of the built-in set, every draw seeded per case so that filtering does not move the others.

    ``keep``: case ids to build (default all). Neighbourhood prompts come only from kept facts of the same
    relation (so a neighbour is a fact the model knows). Counterfactual targets come from all objects of the
    relation whose ``first_token`` (default: first word; pass a tokenizer's so ``top1`` can tell them apart)
    differs from the true object's and the subject's.
    """
    records = []
    for rel in RELATIONS:
        kept = [i for i in range(len(rel.facts)) if keep is None or rel.case_id(i) in keep]
        for i in kept:
            subject, target_true = rel.facts[i]
            rng = random.Random(f"{seed}:{rel.case_id(i)}")
            news = [o for o in rel.objects if first_token(o) not in (first_token(target_true), first_token(subject))]
            target_new = rng.choice(news)
            phrasings = list(rel.templates[1:])
            rng.shuffle(phrasings)
            evaluation, augmentation = phrasings[:N_PARAPHRASES], phrasings[N_PARAPHRASES:][:N_AUGMENTATIONS]
            others = [j for j in kept if j != i and rel.facts[j][1] != target_new]
            neighbours = [rel.facts[j] for j in rng.sample(others, min(N_NEIGHBOURS, len(others)))]
            generation = rng.sample(rel.generation_templates, min(N_GENERATION, len(rel.generation_templates)))
            records.append(
                KnowledgeRecord(
                    case_id=rel.case_id(i),
                    subject=subject,
                    prompt=rel.templates[0],
                    relation_id=rel.relation_id,
                    target_new=target_new,
                    target_true=target_true,
                    paraphrases=[t.format(subject) for t in evaluation],
                    neighborhood=[NeighborhoodPrompt(rel.templates[0].format(s), o) for s, o in neighbours],
                    generation_prompts=[t.format(subject) for t in generation],
                    augmentations=augmentation,
                    source="builtin",
                )
            )
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m retention.data.builtin_facts",
        description="Build the built-in knowledge set, keep the facts a model knows under top1, write JSON.",
    )
    parser.add_argument("--out", type=Path, default=BUILTIN_FACTS_PATH, help="output JSON file")
    parser.add_argument("--model", default="smollm2-135m", help="model whose known facts are kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of counterfactual targets and sampled prompts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-filter", action="store_true", help="keep every candidate (no model is loaded)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    if args.no_filter:
        candidates = records = build_builtin_facts(args.seed)
    else:
        from retention.models import load_model
        from retention.scoring import score_probes, target_ids

        model, tokenizer = load_model(args.model)

        def first_token(text: str) -> int:
            return target_ids(tokenizer, text)[0]

        candidates = build_builtin_facts(args.seed, first_token=first_token)
        probes = [Probe(r.rewrite_prompt, r.target_true, r.target_new, "control", r.case_id) for r in candidates]
        results = score_probes(model, tokenizer, probes, protocols=("top1",), batch_size=args.batch_size, progress=True)
        known = {res.probe.case_id for res in results if res.passed["top1"]}
        records = build_builtin_facts(args.seed, known, first_token)
    total, kept = Counter(r.relation_id for r in candidates), Counter(r.relation_id for r in records)
    print(f"{'relation':<10} {'name':<20} {'candidates':>10} {'kept':>6}")
    for rel in RELATIONS:
        print(f"{rel.relation_id:<10} {rel.name:<20} {total[rel.relation_id]:>10} {kept[rel.relation_id]:>6}")
    print(f"{'total':<31} {sum(total.values()):>10} {len(records):>6}")
    atomic_write_json(args.out, [r.to_dict() for r in records])
    print(f"wrote {len(records)} records to {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
